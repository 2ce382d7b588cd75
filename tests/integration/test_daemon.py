"""The real daemon (`python -m dingdifyd run`: supervisor + bot processes) against the simulators, with a real
NOTIFY_SOCKET: what an operator sees when a bot process is killed or the service is stopped mid-answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dingdifyd.simulator.dify import ANSWER_TAIL, FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import API_BATCH_SEND, FakeDingTalk
from tests.integration.harness import CLIENT_SECRET, ask, dify_key, push_text, write_config

pytestmark = pytest.mark.timeout(90)
WAIT = 30.0


class AsyncNotifySocket:
    """systemd's end of sd_notify, read without blocking the event loop the simulators run on."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.fields: list[str] = []

    async def wait_for(self, prefix: str, count: int = 1) -> list[str]:
        loop = asyncio.get_running_loop()

        async def collect() -> list[str]:
            while len(found := [f for f in self.fields if f.startswith(prefix)]) < count:
                data = await loop.sock_recv(self.sock, 65536)
                self.fields.extend(data.decode().split("\n"))
            return found

        return await asyncio.wait_for(collect(), WAIT)


class Daemon:
    def __init__(self, process: asyncio.subprocess.Process, notify: AsyncNotifySocket):
        self.process = process
        self.notify = notify

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    async def wait_children(self, exclude: set[int] = frozenset()) -> list[int]:
        async def poll() -> list[int]:
            while not (pids := [p for p in self.children() if p not in exclude]):
                await asyncio.sleep(0.05)
            return pids

        return await asyncio.wait_for(poll(), WAIT)


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True)
    fake.configure(dify_key("chatbot"), token_delay=0.002, mention_turn=True)
    yield fake
    await fake.close()


@pytest.fixture
async def daemon(tmp_path, dingtalk, dify) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path, dingtalk, dify) as running:
        yield running


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, dingtalk: FakeDingTalk, dify: FakeDify, **settings) -> AsyncIterator[Daemon]:
    config = write_config(tmp_path / "daemon.yaml", dingtalk, dify, stop_timeout=3, restart_delay_min=0.05,
                          **settings)  # fmt: skip
    notify = AsyncNotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "NO_PROXY": "127.0.0.1,localhost"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd", "run", "-c", str(config), env=env, stderr=asyncio.subprocess.PIPE
    )
    logs = asyncio.create_task(process.stderr.read())  # type: ignore[union-attr]
    running = Daemon(process, notify)
    try:
        await notify.wait_for("READY=1")
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        output = await logs
        assert CLIENT_SECRET.encode() not in output  # whatever happened, no secret in the daemon's log
        notify.sock.close()


async def test_ready_then_answers(daemon, dingtalk):
    card = await ask(dingtalk, "hello daemon", timeout=WAIT)
    assert "hello daemon" in card.final_content
    assert not card.failed
    status = await daemon.notify.wait_for("STATUS=")
    assert any("1/1 bots connected" in s for s in status)


async def test_a_killed_bot_process_is_replaced_and_finishes_what_it_was_answering(daemon, dingtalk, dify):
    await ask(dingtalk, "first turn", sender_staff_id="u1", timeout=WAIT)
    dify.next_request(dify_key("chatbot"), token_delay=0.3)  # long enough to be killed mid-answer
    frame, track = push_text(dingtalk, "interrupted turn", sender_staff_id="u1")
    await dingtalk.wait_for(lambda: track in dingtalk.cards and dingtalk.cards[track].timeline, WAIT, "first text")
    (victim,) = daemon.children()
    os.kill(victim, signal.SIGKILL)
    replacement = await daemon.wait_children(exclude={victim})
    assert replacement and victim not in replacement
    # the new process finishes the answer the killed one had started, in the same card
    resumed = await dingtalk.wait_card_final(track, timeout=WAIT)
    assert not resumed.failed
    assert "interrupted turn" in resumed.final_content
    # DingTalk redelivering that message is answered once: no second card, no extra Dify call afterwards
    calls = len(dify.requests_to("/chat-messages"))
    dingtalk.redeliver(frame)
    await dingtalk.wait_for(lambda: len(dingtalk.acks_for(frame)) >= 2, WAIT, "the redelivery's ACK")
    later = await ask(dingtalk, "after the crash", sender_staff_id="u1", timeout=WAIT)
    assert len(dify.requests_to("/chat-messages")) == calls + 1
    assert len([c for c in dingtalk.cards if c == track]) == 1
    # and the conversation went on across the crash
    conversation_ids = {r.json.get("conversation_id") for r in dify.requests_to("/chat-messages")[1:]}
    assert len(conversation_ids) == 1 and None not in conversation_ids
    assert "Turn" in later.final_content


async def test_sigterm_with_answers_in_flight_ends_every_card_and_exits_0(daemon, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.5)  # answers outlive the 3 s stop bound
    tracks = [push_text(dingtalk, f"long question {i}", sender_staff_id=f"user{i}")[1] for i in range(5)]
    await dingtalk.wait_for(lambda: all(t in dingtalk.cards and dingtalk.cards[t].timeline for t in tracks), WAIT,
                            "every card showing text")  # fmt: skip
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.process.wait(), WAIT) == 0
    await daemon.notify.wait_for("STOPPING=1")
    for track in tracks:
        card = dingtalk.cards[track]
        assert card.done, "a card was left typing"
        assert card.failed and "could not finish this answer" in card.final_content
        assert ANSWER_TAIL not in card.final_content  # cut, not completed


async def test_a_bot_killed_after_delivering_its_answer_does_not_answer_again(tmp_path, dingtalk, dify):
    """kill -9 between the card's final update and the end of the answer (here: while the image that follows
    the card is being sent): the successor sends what was left, and neither asks Dify again nor repeats the
    answer as a plain reply."""
    dify.configure(dify_key("chatbot"), message_file=True)  # a tool image, sent after the card (below)
    async with running_daemon(tmp_path, dingtalk, dify, image_delivery="message") as daemon:
        dingtalk.fail_next(API_BATCH_SEND, delay=60)  # the send after the card hangs: the bot is killed then
        _, track = push_text(dingtalk, "draw me a cat", sender_staff_id="u7")
        card = await dingtalk.wait_card_final(track, timeout=WAIT)
        await dingtalk.wait_for(lambda: dingtalk.calls[API_BATCH_SEND] >= 1, WAIT, "the send after the card")
        (victim,) = daemon.children()
        os.kill(victim, signal.SIGKILL)
        await daemon.wait_children(exclude={victim})
        (sent,) = await dingtalk.wait_for(lambda: dingtalk.sent_messages, WAIT, "the image, sent by the successor")
    assert not card.failed and "draw me a cat" in card.final_content
    assert len(dify.requests_to("/chat-messages")) == 1  # the successor did not ask Dify again
    assert dingtalk.webhook_replies == []  # nor send the whole answer again as a reply
    assert len([u for u in dingtalk.cards[track].timeline if u.is_finalize]) == 1
    assert sent.body["msgKey"] == "sampleImageMsg"
