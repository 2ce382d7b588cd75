"""Bad input never kills a bot: odd DingTalk payloads, malformed frames, malformed Dify streams, end to end.

Each case is answered clearly where a person is waiting, logged otherwise, and the bot answers normally
afterwards. The fuzz tests use seeded randomness (reproducible) and a bounded number of cases.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from dingdifyd.bridge import intake
from dingdifyd.bridge.session import out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator.dify import VERSIONS, FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import CHATBOT_TOPIC, FakeDingTalk
from tests.integration.harness import CLIENT_ID, bot_entry, deliver, dify_key, running_bot, write_config

pytestmark = pytest.mark.timeout(90)
WAIT = 20.0
FRAME_CASES = 120
SSE_CASES = 20


@pytest.fixture(params=VERSIONS, ids=lambda version: f"dify-{version}")
async def dify(request: pytest.FixtureRequest) -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True, version=request.param)
    fake.configure(dify_key("chatbot"), token_delay=0.001)
    yield fake
    await fake.close()


def track_of(data: dict[str, Any]) -> str:
    message = parse_incoming(data)
    assert message is not None
    return out_track_id(message)


def crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that mean something escaped: tracebacks of ours, or asyncio's unretrieved exceptions."""
    return [
        f"{r.name}: {r.getMessage()[:200]}"
        for r in caplog.records
        if (r.exc_info and r.name.startswith("dingdifyd")) or (r.name == "asyncio" and r.levelno >= logging.ERROR)
    ]


# --- payloads DingTalk really sends --------------------------------------------------------------------------


async def test_odd_messages_are_answered_clearly_and_the_bot_goes_on(tmp_path, dingtalk, dify, caplog):
    caplog.set_level(logging.INFO)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)) as runtime:
        unknown = await deliver(dingtalk, dingtalk.make_message("unknownMsgType", sender_staff_id="u1"))
        video = await deliver(dingtalk, dingtalk.make_message("video", sender_staff_id="u2"))
        quota = await deliver(dingtalk, dingtalk.make_quota_exhausted_message(sender_staff_id="u3"))
        huge = await deliver(dingtalk, dingtalk.make_text_message("x" * 100_000, sender_staff_id="u4"))
        # JSON can carry what no UTF-8 encoder accepts (lone surrogates): it must not reach Dify, the card or
        # the store as such
        broken = dingtalk.make_text_message("placeholder", sender_staff_id="u5")
        raw = json.dumps(broken).replace("placeholder", "broken \\ud800 text \\udfff end")
        frame = dingtalk.push_raw(CLIENT_ID, json.dumps(
            {"specVersion": "1.0", "type": "CALLBACK", "data": json.loads(raw) and raw,
             "headers": {"messageId": "surrogates-1", "topic": CHATBOT_TOPIC, "time": "1690362102194",
                         "contentType": "application/json"}}))  # fmt: skip
        assert frame == 1
        surrogate_card = await dingtalk.wait_card_final(track_of(broken), WAIT)
        # a quota-exhausted payload with nobody to answer: logged, ACKed, no card
        orphan = dingtalk.make_quota_exhausted_message()
        for key in ("senderStaffId", "senderId", "conversationId", "sessionWebhook"):
            orphan.pop(key)
        await dingtalk.wait_ack(dingtalk.push_message(CLIENT_ID, orphan), WAIT)
        after = await deliver(dingtalk, dingtalk.make_text_message("still there?", sender_staff_id="u6"))
        assert runtime.connected.is_set()
    for card in (unknown, video):
        assert card.final_content and not card.failed  # a plain word about what the bot can read
    assert quota.final_content == intake.DINGTALK_ERROR
    assert "100,000 characters" in huge.final_content
    assert "broken \ufffd text \ufffd end" in surrogate_card.final_content
    assert "still there?" in after.final_content
    asked = [r.json["query"] for r in dify.requests_to("/chat-messages")]
    assert asked == ["broken \ufffd text \ufffd end", "still there?"]  # nothing else reached Dify
    assert track_of(orphan) not in dingtalk.cards
    assert any("no sender or conversation" in r.getMessage() for r in caplog.records)
    assert "x" * 100 not in caplog.text  # the refused text is not logged
    assert crashes(caplog) == []


async def test_a_message_without_a_conversation_type_gets_the_group_rules(tmp_path, dify, caplog):
    dingtalk = FakeDingTalk(ping_interval=None, redeliver_after=None)
    dingtalk.register_app(CLIENT_ID, "secret-for-this-test")
    async with dingtalk:
        config = write_config(tmp_path / "c.yaml", dingtalk, dify, allow_groups=["cidTEAM=="],
                              bots=[bot_entry(client_secret="secret-for-this-test")])  # fmt: skip
        async with running_bot(config) as runtime:
            data = dingtalk.make_text_message("let me in", group=True, conversation_id="cidOTHER==")
            data.pop("conversationType")  # as if it were a 1:1 chat, which allow_groups does not restrict
            dingtalk.push_message(CLIENT_ID, data)
            (reply,) = await dingtalk.wait_webhook_replies(1, WAIT)
            await dingtalk.wait_for(lambda: runtime.bridge.in_flight == 0, WAIT, "the refusal to be sent")
    assert "not allowed" in json.dumps(reply.body)
    assert dify.requests_to("/chat-messages") == []  # refused, as a message from a group not allowed
    assert track_of(data) not in dingtalk.cards
    assert any("conversationType" in r.getMessage() for r in caplog.records)


async def test_a_malformed_frame_is_acked_once_and_logged_once(tmp_path, dify, caplog):
    caplog.set_level(logging.INFO)
    dingtalk = FakeDingTalk(ping_interval=None, redeliver_after=0.3)  # DingTalk redelivers what is not ACKed
    dingtalk.register_app(CLIENT_ID, "secret-for-this-test")
    async with dingtalk:
        config = write_config(tmp_path / "c.yaml", dingtalk, dify,
                              bots=[bot_entry(client_secret="secret-for-this-test")])  # fmt: skip
        async with running_bot(config):
            frame = {"specVersion": "1.0", "type": "CALLBACK", "data": "{}",
                     "headers": {"messageId": "malformed-1", "topic": CHATBOT_TOPIC, "time": "soon",
                                 "contentType": "application/json"}}  # fmt: skip
            dingtalk.push_frame(CLIENT_ID, frame)
            ack = await dingtalk.wait_ack("malformed-1", WAIT)
            assert ack.code == 200
            dingtalk.redeliver("malformed-1")  # should DingTalk send it again anyway, it is ACKed again, quietly
            await dingtalk.wait_for(lambda: len(dingtalk.acks_for("malformed-1")) >= 2, WAIT, "the second ACK")
            card = await deliver(dingtalk, dingtalk.make_text_message("still fine?"))
    assert dingtalk.deliveries("malformed-1") == 2  # the ACK stopped DingTalk's own redelivery
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "malformed-1" in r.getMessage()]
    assert len(warnings) == 1
    assert "still fine?" in card.final_content


# --- malformed Stream frames ---------------------------------------------------------------------------------


def random_text(rng: random.Random, size: int) -> str:
    alphabet = "abc xyz 中文 \\\"{}[]:,\n\t\u200b\u0000😀"
    return "".join(rng.choice(alphabet) for _ in range(size))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "none", "bool", "list", "dict", "escaped"]
    kind = rng.choice(kinds if depth < 2 else kinds[:5])
    if kind == "str":
        return random_text(rng, rng.randint(0, 12))
    if kind == "int":
        return rng.choice([0, -1, 2**63, 7])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-9])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return {random_text(rng, 4): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return "\udc80 lone surrogate"


def fuzzed_message(rng: random.Random, dingtalk: FakeDingTalk, index: int) -> dict[str, Any]:
    """A robot message payload with some fields missing, mistyped or absurd."""
    data = dingtalk.make_text_message(f"fuzz {index}", sender_staff_id=f"fuzzer{index % 5}",
                                      group=rng.random() < 0.3)  # fmt: skip
    for key in list(data):
        roll = rng.random()
        if roll < 0.08:
            del data[key]
        elif roll < 0.16 and key != "sessionWebhook":  # (a random webhook could point anywhere)
            data[key] = random_value(rng)
    choice = rng.random()
    if choice < 0.15:
        data["msgtype"] = rng.choice(["picture", "richText", "audio", "file", "video", "unknownMsgType", "", 5])
        data["content"] = random_value(rng)
    elif choice < 0.25:
        data["text"] = {"content": random_text(rng, rng.choice([0, 5, 30_000]))}
    elif choice < 0.3:
        data["errorMessage"] = random_value(rng)
    return data


def fuzzed_frame(rng: random.Random, dingtalk: FakeDingTalk, index: int) -> str:
    headers = {"messageId": f"fuzz-{index}", "topic": CHATBOT_TOPIC, "time": "1690362102194",
               "contentType": "application/json"}  # fmt: skip
    frame: dict[str, Any] = {"specVersion": "1.0", "type": "CALLBACK", "headers": headers,
                             "data": json.dumps(fuzzed_message(rng, dingtalk, index), ensure_ascii=rng.random() < 0.5)}
    mutation = rng.randrange(14)
    if mutation == 0:
        return random_text(rng, rng.randint(0, 80))  # not JSON at all
    if mutation == 1:
        return json.dumps(random_value(rng))  # JSON, but not an object
    if mutation == 2:
        return json.dumps(frame)[: rng.randint(1, 60)]  # cut short
    if mutation == 3:
        frame["data"] = json.loads(frame["data"])  # an object where the SDK wants a JSON string
    elif mutation == 4:
        frame["data"] = frame["data"][: rng.randint(0, 40)]  # a JSON string that is not JSON
    elif mutation == 5:
        headers["time"] = random_value(rng)
    elif mutation == 6:
        frame["headers"] = random_value(rng)
    elif mutation == 7:
        headers["topic"] = random_value(rng)  # an unknown (or unhashable) topic
    elif mutation == 8:
        frame["type"] = random_value(rng)
    elif mutation == 9:
        frame["type"] = "SYSTEM"
        headers["topic"] = rng.choice(["CONNECTED", "REGISTERED", "KEEPALIVE", "ping", "surprise"])
    elif mutation == 10:
        frame["type"] = "EVENT"
    elif mutation == 11:
        frame["data"] = json.dumps(random_value(rng))  # a JSON string of anything
    elif mutation == 12:
        headers["messageId"] = random_value(rng)
    return as_text_frame(frame)  # 13: a well-formed frame of a fuzzed message


def as_text_frame(frame: Any) -> str:
    """Raw UTF-8 where it can be; a text frame cannot carry lone surrogates, so those stay JSON escapes."""
    text = json.dumps(frame, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(frame)
    return text


async def test_random_and_malformed_frames_kill_nothing(tmp_path, dingtalk, dify, caplog):
    caplog.set_level(logging.INFO)
    rng = random.Random(1729)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)) as runtime:
        for index in range(FRAME_CASES):
            assert dingtalk.push_raw(CLIENT_ID, fuzzed_frame(rng, dingtalk, index)) == 1
        # whatever those were, an ordinary message is answered
        card = await deliver(dingtalk, dingtalk.make_text_message("after the storm", sender_staff_id="calm"))
        assert runtime.bridge is not None
        await dingtalk.wait_for(lambda: runtime.bridge.in_flight == 0, WAIT, "every answer to end")
        assert runtime.connected.is_set()
    assert "after the storm" in card.final_content and not card.failed
    assert len(dingtalk.open_requests) == 1  # the connection itself never went down
    assert all(c.done for c in dingtalk.cards.values()), "a card was left typing"
    assert len(dingtalk.cards) > 10  # some fuzzed messages were well-formed enough to be answered
    assert crashes(caplog) == []
    assert "sendBySession?session=" not in caplog.text  # sessionWebhooks are credentials, even in odd frames
    assert "fuzz 1" not in caplog.text  # and message text stays out of the log, however a frame looks


# --- malformed Dify streams ----------------------------------------------------------------------------------


def good_stream(answer: str) -> bytes:
    ids = {"conversation_id": "6b0bbdab-3ad9-4e35-8e8c-6a8d31a5e7a1", "message_id": "m1", "task_id": "t1"}
    events = [{"event": "message", **ids, "answer": word} for word in answer.split(" ")[:1]]
    events += [{"event": "message", **ids, "answer": " " + word} for word in answer.split(" ")[1:]]
    events.append({"event": "message_end", **ids, "metadata": {}})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)


def malformed_stream(rng: random.Random) -> bytes:
    ids = {"conversation_id": rng.choice(["", "6b0bbdab-3ad9-4e35-8e8c-6a8d31a5e7a1", "not-a-uuid", "x" * 300]),
           "message_id": "m", "task_id": "t"}  # fmt: skip
    pieces = [
        b"data: {not json}\n\n",
        b"data: [1, 2, 3]\n\n",
        b"data: 42\n\n",
        b"data: \xff\xfe\xfd invalid utf-8\n\n",
        b"\x00\x01\x02 binary noise \xc3\x28\n",
        b"event: ping\n\n",
        b": a comment line\n\n",
        b"data: {\"event\": \"message\", \"answer\": {\"nested\": true}}\n\n",
        b"data: {\"event\": \"message_replace\"}\n\n",
        b"data: {\"event\": \"workflow_finished\", \"data\": \"a string\"}\n\n",
        b"data: {\"event\": \"agent_thought\", \"position\": \"first\"}\n\n",
        b"data: {\"event\": \"error\"}\n\n",
        b"data: {\"event\": \"error\", \"status\": \"teapot\", \"code\": [1]}\n\n",
        b"data: {\"event\": \"" + b"y" * 200_000 + b"\"}\n\n",  # one enormous line
        b"data: {\"event\": \"message\",\r\ndata: \"answer\": \"split over two data lines\"}\r\n\r\n",
        f"data: {json.dumps({'event': 'message', **ids, 'answer': 'partial '})}\n\n".encode(),
        f"data: {json.dumps({'event': 'message', **ids, 'answer': random_text(rng, 20)})}\n\n".encode(),
        b"data: {\"event\": \"message_end\"",  # cut inside the terminal event
        b"retry: 10\nid: 5\n\n",
        b"data:\n\n",
        b"\n\n\n\r\r\n",
    ]
    chosen = [rng.choice(pieces) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.3:  # sometimes it even ends properly, after the garbage
        chosen.append(f"data: {json.dumps({'event': 'message_end', **ids})}\n\n".encode())
    return b"".join(chosen)


class MalformedDify:
    """A tiny stand-in for Dify whose answers are malformed event streams, except for "hello"."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.asked: list[str] = []
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> MalformedDify:
        app = web.Application()
        app.router.add_get("/v1/parameters", self._parameters)
        app.router.add_post("/v1/chat-messages", self._chat)
        app.router.add_post("/v1/chat-messages/{task_id}/stop", self._stop)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def close(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _parameters(self, request: web.Request) -> web.Response:
        return web.json_response({"user_input_form": [], "suggested_questions_after_answer": {"enabled": False}})

    async def _stop(self, request: web.Request) -> web.Response:
        return web.json_response({"result": "success"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        query = str((await request.json()).get("query"))
        self.asked.append(query)
        body = good_stream("Hello back.") if query == "hello" else malformed_stream(self.rng)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        position = 0
        while position < len(body):  # in pieces that end anywhere: inside lines, characters, events
            size = self.rng.randint(1, 4096)
            await response.write(body[position : position + size])
            position += size
        await response.write_eof()
        return response


async def test_malformed_dify_streams_end_every_card_and_the_bot_answers_afterwards(tmp_path, dingtalk, caplog):
    caplog.set_level(logging.INFO)
    dify = await MalformedDify(seed=31337).start()
    try:
        config = write_config(tmp_path / "c.yaml", dingtalk, dify)  # type: ignore[arg-type]
        async with running_bot(config) as runtime:
            tracks = []
            for index in range(SSE_CASES):
                data = dingtalk.make_text_message(f"fuzz-{index}", sender_staff_id="same-person")
                tracks.append(track_of(data))
                dingtalk.push_message(CLIENT_ID, data)
            cards = [await dingtalk.wait_card_final(track, WAIT) for track in tracks]
            after = await deliver(dingtalk, dingtalk.make_text_message("hello", sender_staff_id="same-person"))
            assert runtime.bridge is not None
            await dingtalk.wait_for(lambda: runtime.bridge.in_flight == 0, WAIT, "every answer to end")
    finally:
        await dify.close()
    assert after.final_content == "Hello back." and not after.failed
    assert all(card.final_content for card in cards)  # every card ended with something readable
    assert any(card.failed for card in cards)  # (the garbage was bad enough to fail some)
    assert len(dify.asked) >= SSE_CASES + 1
    assert crashes(caplog) == []
