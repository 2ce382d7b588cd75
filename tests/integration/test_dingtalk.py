"""The DingTalk adapter against the loopback fake DingTalk, through the real SDK and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dingdifyd.bridge.session import out_track_id
from dingdifyd.config import Secret
from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.dingtalk.cards import BUILTIN_TEMPLATE_ID, AICard
from dingdifyd.dingtalk.stream import StreamConnection, parse_incoming
from dingdifyd.errors import (
    CardAlreadyExists,
    DingTalkAuthError,
    DingTalkError,
    DingTalkRateLimited,
    DingTalkUnavailable,
)
from dingdifyd.models import IncomingMessage
from dingdifyd.simulator import dingtalk as fd
from dingdifyd.simulator.dingtalk import FakeDingTalk

pytestmark = pytest.mark.timeout(30)

CLIENT_ID = "dingtestclient"
SECRET = "s3cret-never-logged"
TEMPLATE = "tpl-test.schema"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDingTalk]:
    fake = FakeDingTalk(ping_interval=None)
    fake.register_app(CLIENT_ID, SECRET)
    await fake.start()
    yield fake
    await fake.close()


def make_api(fake: FakeDingTalk, session: aiohttp.ClientSession, **kwargs: Any) -> DingTalkApi:
    kwargs.setdefault("retry_base_delay", 0.01)
    return DingTalkApi(client_id=CLIENT_ID, client_secret=Secret(SECRET), session=session,
                       api_base=fake.base_url, oapi_base=fake.base_url, **kwargs)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[IncomingMessage] = []
        self.states: list[str] = []

    def connected(self, times: int = 1) -> Callable[[], bool]:
        return lambda: self.states.count("connected") >= times


def make_connection(fake: FakeDingTalk, session: aiohttp.ClientSession, recorder: Recorder,
                    secret: str = SECRET, **kwargs: Any) -> StreamConnection:
    kwargs.setdefault("reconnect_min_delay", 0.02)
    kwargs.setdefault("reconnect_max_delay", 0.2)
    return StreamConnection(client_id=CLIENT_ID, client_secret=Secret(secret), api_base=fake.base_url,
                            session=session, on_message=recorder.messages.append,
                            on_state=recorder.states.append, open_timeout=5.0, **kwargs)


@contextlib.asynccontextmanager
async def running(connection: StreamConnection) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(connection.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=10)


async def finishes(task: asyncio.Task[Any], timeout: float = 5.0) -> None:
    """Wait for `task` to end, failing the test instead of hanging if it never does."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    assert task in done, "the task did not end"


# --- the Stream connection ----------------------------------------------------------------------------------


async def test_incoming_message_reaches_on_message_and_is_acked(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        data = fake.make_text_message("hello robot")
        frame_id = fake.push_message(CLIENT_ID, data)
        ack = await fake.wait_ack(frame_id)
        assert ack.code == 200
        assert ack.response == {"response": "OK"}
        assert [m.msg_id for m in recorder.messages] == [data["msgId"]]
        assert recorder.messages[0].text == "hello robot"
        assert recorder.messages[0].robot_code == CLIENT_ID
        opened = fake.open_requests[0]
        assert opened["clientId"] == CLIENT_ID
        assert opened["subscriptions"] == [{"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"}]
        assert opened["localIp"] == ""
        assert opened["ua"].startswith("dingtalk-sdk-python/v")
        assert recorder.states == ["connected"]


async def test_ping_is_acked_with_its_data_and_not_warned_about(fake: FakeDingTalk, session, caplog):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        (ping_id,) = fake.push_ping(CLIENT_ID)
        ack = await fake.wait_ack(ping_id)
        assert ack.code == 200
        assert set(ack.response) == {"opaque"}
    assert not [r for r in caplog.records if "unknown message topic" in r.getMessage()]


async def test_group_message_and_quota_exhausted_message_both_arrive(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        group = fake.make_text_message("in the group", group=True, conversation_id="cidGROUP==")
        quota = fake.make_quota_exhausted_message()
        acks = [fake.push_message(CLIENT_ID, group), fake.push_message(CLIENT_ID, quota)]
        for frame_id in acks:
            assert (await fake.wait_ack(frame_id)).code == 200
        by_id = {m.msg_id: m for m in recorder.messages}
        assert by_id[group["msgId"]].is_group
        assert by_id[group["msgId"]].text == "in the group"
        assert by_id[quota["msgId"]].text == ""


async def test_malformed_frames_do_not_kill_the_connection(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        good_headers = {"messageId": "bad1", "time": "1690362102194", "topic": "/v1.0/im/bot/messages/get"}
        fake.push_raw(CLIENT_ID, "this is not json")
        object_data = {"type": "CALLBACK", "headers": good_headers, "data": {"msgId": "x"}}
        fake.push_raw(CLIENT_ID, json.dumps(object_data))
        fake.push_raw(CLIENT_ID, json.dumps({"type": "CALLBACK", "headers": dict(good_headers, time="noon"),
                                             "data": "{}"}))
        fake.push_raw(CLIENT_ID, json.dumps({"type": "CALLBACK", "headers": good_headers, "data": "{oops"}))
        data = fake.make_text_message("still here?")
        frame_id = fake.push_message(CLIENT_ID, data)
        await fake.wait_ack(frame_id)
        assert [m.msg_id for m in recorder.messages] == [data["msgId"]]
        assert recorder.states == ["connected"]
        assert fake.connection_count(CLIENT_ID) == 1


async def test_reconnects_after_the_connection_drops(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        assert fake.drop_connections(CLIENT_ID) == 1
        await fake.wait_for(recorder.connected(2), what="a reconnect")
        assert recorder.states[:3] == ["connected", "disconnected", "connected"]
        data = fake.make_text_message("after the drop")
        await fake.wait_ack(fake.push_message(CLIENT_ID, data))
        assert recorder.messages[-1].msg_id == data["msgId"]
        assert len(fake.open_requests) == 2  # a fresh ticket each time


async def test_reconnects_with_a_fresh_ticket_after_a_disconnect_request(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        (disconnect_id,) = fake.push_disconnect(CLIENT_ID)
        assert (await fake.wait_ack(disconnect_id)).code == 200
        await fake.wait_for(recorder.connected(2), what="a reconnect")
        data = fake.make_text_message("after the disconnect")
        await fake.wait_ack(fake.push_message(CLIENT_ID, data))
        assert recorder.messages[-1].msg_id == data["msgId"]
        assert len(fake.open_requests) == 2


async def test_a_message_pushed_while_disconnected_arrives_after_the_reconnect(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder, reconnect_min_delay=0.3, reconnect_max_delay=0.3)):
        await fake.wait_connections(1)
        fake.drop_connections(CLIENT_ID)
        await fake.wait_for(lambda: fake.connections == 0, what="the drop")
        data = fake.make_text_message("while away")
        frame_id = fake.push_message(CLIENT_ID, data)
        await fake.wait_ack(frame_id)
        assert recorder.messages[-1].msg_id == data["msgId"]


async def test_redelivery_carries_the_same_ids_and_is_acked_again(fake: FakeDingTalk, session):
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        data = fake.make_text_message("once")
        frame_id = fake.push_message(CLIENT_ID, data)
        await fake.wait_ack(frame_id)
        fake.redeliver(frame_id)
        await fake.wait_for(lambda: len(fake.acks_for(frame_id)) == 2, what="the second ACK")
        assert [m.msg_id for m in recorder.messages] == [data["msgId"], data["msgId"]]
        assert fake.deliveries(frame_id) == 2


async def test_unacked_callbacks_are_redelivered_by_the_fake(session):
    async with FakeDingTalk(ping_interval=None, redeliver_after=0.1) as fake:
        fake.register_app(CLIENT_ID, SECRET)
        frame_id = fake.push_message(CLIENT_ID, fake.make_text_message("nobody listens"))
        recorder = Recorder()
        await asyncio.sleep(0.3)  # nobody connected: the frame waits for a connection
        assert fake.deliveries(frame_id) == 0
        async with running(make_connection(fake, session, recorder)):
            await fake.wait_ack(frame_id)
        assert fake.deliveries(frame_id) >= 1


async def test_cancelling_run_ends_it_while_connected(fake: FakeDingTalk, session):
    recorder = Recorder()
    task = asyncio.create_task(make_connection(fake, session, recorder).run())
    await fake.wait_for(recorder.connected(), what="the connection")
    task.cancel()
    await finishes(task)
    assert task.cancelled()
    assert recorder.states == ["connected", "disconnected"]
    await fake.wait_for(lambda: fake.connections == 0, what="the server to see the close")


async def test_cancelling_run_ends_it_while_it_waits_to_retry(fake: FakeDingTalk, session):
    fake.fail_next(fd.API_GATEWAY_OPEN, 5, status=500)
    recorder = Recorder()
    connection = make_connection(fake, session, recorder, reconnect_min_delay=60.0, reconnect_max_delay=60.0)
    task = asyncio.create_task(connection.run())
    await fake.wait_for(lambda: fake.calls[fd.API_GATEWAY_OPEN] >= 1, what="the first open")
    task.cancel()
    await finishes(task)
    assert task.cancelled()
    assert recorder.states == []


async def test_close_makes_run_return(fake: FakeDingTalk, session):
    recorder = Recorder()
    connection = make_connection(fake, session, recorder)
    task = asyncio.create_task(connection.run())
    await fake.wait_for(recorder.connected(), what="the connection")
    await connection.close()
    await finishes(task)
    assert task.result() is None
    assert recorder.states == ["connected", "disconnected"]


async def test_bad_credentials_end_run_with_an_auth_error(fake: FakeDingTalk, session, caplog):
    recorder = Recorder()
    task = asyncio.create_task(make_connection(fake, session, recorder, secret="wrong-secret").run())
    await finishes(task)
    with pytest.raises(DingTalkAuthError) as raised:
        task.result()
    assert raised.value.exit_code == 78
    assert "wrong-secret" not in str(raised.value)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused the credentials" in line for line in errors)
    assert "wrong-secret" not in caplog.text


async def test_gateway_failures_and_odd_answers_are_retried(fake: FakeDingTalk, session):
    fake.fail_next(fd.API_GATEWAY_OPEN, status=500)
    fake.fail_next(fd.API_GATEWAY_OPEN, status=200, body={})
    fake.fail_next(fd.API_GATEWAY_OPEN, status=200, body={"foo": 1})
    recorder = Recorder()
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        assert fake.calls[fd.API_GATEWAY_OPEN] == 4


async def test_used_or_unknown_tickets_are_refused_before_the_upgrade(fake: FakeDingTalk, session):
    credentials = {"clientId": CLIENT_ID, "clientSecret": SECRET, "subscriptions": []}
    async with session.post(f"{fake.base_url}/v1.0/gateway/connections/open", json=credentials) as response:
        opened = await response.json()
    ws_url = fake.base_url.replace("http", "ws") + "/connect"
    async with session.ws_connect(f"{ws_url}?ticket={opened['ticket']}") as ws:
        assert not ws.closed
    for ticket, status in ((opened["ticket"], 403), ("made-up", 401)):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{ws_url}?ticket={ticket}")
        assert refused.value.status == status


async def test_several_connections_share_the_messages(session):
    async with FakeDingTalk(ping_interval=None) as fake:
        fake.register_app(CLIENT_ID, SECRET)
        recorders = [Recorder(), Recorder()]
        async with running(make_connection(fake, session, recorders[0])), \
                running(make_connection(fake, session, recorders[1])):
            await fake.wait_connections(2)
            frame_ids = [fake.push_message(CLIENT_ID, fake.make_text_message(f"m{i}")) for i in range(30)]
            for frame_id in frame_ids:
                await fake.wait_ack(frame_id)
        counts = [len(r.messages) for r in recorders]
        assert sum(counts) == 30
        assert all(counts), f"one connection got nothing: {counts}"


# --- token --------------------------------------------------------------------------------------------------


async def test_token_is_fetched_once_for_many_concurrent_callers(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    tokens = await asyncio.gather(*(api.access_token() for _ in range(100)))
    assert len(set(tokens)) == 1
    assert fake.token_fetches[CLIENT_ID] == 1
    assert await api.access_token() == tokens[0]
    assert fake.token_fetches[CLIENT_ID] == 1


async def test_token_is_refreshed_five_minutes_before_it_expires(fake: FakeDingTalk, session):
    now = [1000.0]
    api = make_api(fake, session, clock=lambda: now[0])
    await api.access_token()
    now[0] += 7200 - 300 - 1
    await api.access_token()
    assert fake.token_fetches[CLIENT_ID] == 1
    now[0] += 2
    await api.access_token()
    assert fake.token_fetches[CLIENT_ID] == 2


async def test_a_401_drops_the_token_and_retries_once_with_a_new_one(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    card = AICard(api, out_track_id="t401", template_id=TEMPLATE, message=one_to_one(fake))
    await card.open()
    old = await api.access_token()
    fake.revoke_tokens()
    await card.finish("done")
    assert fake.token_fetches[CLIENT_ID] == 2
    assert await api.access_token() != old
    assert fake.cards["t401"].final_content == "done"


async def test_bad_credentials_for_the_token_raise_an_auth_error(fake: FakeDingTalk, session):
    api = DingTalkApi(client_id=CLIENT_ID, client_secret=Secret("nope-secret"), session=session,
                      api_base=fake.base_url)
    with pytest.raises(DingTalkAuthError) as raised:
        await api.access_token()
    assert raised.value.code == "invalidClientIdOrSecret"
    assert "nope-secret" not in str(raised.value)


# --- cards --------------------------------------------------------------------------------------------------


def one_to_one(fake: FakeDingTalk, **kwargs: Any) -> IncomingMessage:
    message = parse_incoming(fake.make_text_message("question", **kwargs))
    assert message is not None
    return message


async def test_card_with_a_template_streams_and_finishes(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    message = one_to_one(fake, sender_staff_id="staff42")
    track = out_track_id(message)
    card = AICard(api, out_track_id=track, template_id=TEMPLATE, message=message)
    await card.open()
    await card.update("Hel")
    await card.update("Hello")
    await card.finish("Hello, world")
    state = await fake.wait_card_final(track)
    body = state.create_body
    assert body["cardTemplateId"] == TEMPLATE
    assert body["cardData"] == {"cardParamMap": {"content": ""}}
    assert body["openSpaceId"] == "dtv1.card//IM_ROBOT.staff42"
    assert body["imRobotOpenSpaceModel"] == {"supportForward": True}
    assert body["imRobotOpenDeliverModel"] == {"spaceType": "IM_ROBOT"}
    assert body["callbackType"] == "STREAM"
    assert state.contents == ["Hel", "Hello", "Hello, world"]
    assert {u.key for u in state.timeline} == {"content"}
    assert [u.is_finalize for u in state.timeline] == [False, False, True]
    assert all(u.is_full for u in state.timeline)
    assert state.final_content == "Hello, world"
    assert not state.failed
    await card.update("too late")  # a closed card ignores further calls
    assert fake.calls[fd.API_CARD_STREAMING] == 3


async def test_card_in_a_group_is_delivered_to_the_group(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    message = parse_incoming(fake.make_text_message("q", group=True, conversation_id="cidGRP42=="))
    card = AICard(api, out_track_id="group-card", template_id=TEMPLATE, message=message)
    await card.open()
    body = fake.cards["group-card"].create_body
    assert body["openSpaceId"] == "dtv1.card//IM_GROUP.cidGRP42=="
    assert body["imGroupOpenSpaceModel"] == {"supportForward": True}
    assert body["imGroupOpenDeliverModel"] == {"robotCode": CLIENT_ID}


async def test_card_with_the_builtin_template_moves_through_its_flow_states(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    card = AICard(api, out_track_id="builtin", template_id=None, message=one_to_one(fake))
    await card.open()
    created = fake.cards["builtin"]
    assert created.template_id == BUILTIN_TEMPLATE_ID
    assert created.flow_status == "1"
    assert "order" in json.loads(created.card_param_map["sys_full_json_obj"])
    await card.update("typing")
    assert created.flow_status == "2"
    await card.update("typing more")
    await card.finish("the full answer")
    state = await fake.wait_card_final("builtin")
    # one call per write: the first text rides on the switch to "typing", the end sets the state and the text
    assert [(u["flowStatus"], u["msgContent"]) for u in state.param_updates] == [
        ("2", "typing"), ("3", "the full answer")]
    assert state.contents == ["typing more"]
    assert {u.key for u in state.timeline} == {"msgContent"}
    assert state.final_content == "the full answer"
    assert not state.failed
    assert fake.calls[fd.API_CARD_UPDATE] + fake.calls[fd.API_CARD_STREAMING] == 3


async def test_failing_cards_show_the_error(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    templated = AICard(api, out_track_id="fail-tpl", template_id=TEMPLATE, message=one_to_one(fake))
    builtin = AICard(api, out_track_id="fail-builtin", template_id=None, message=one_to_one(fake))
    for card in (templated, builtin):
        await card.open()
        await card.update("partial")
        await card.fail("The AI service did not answer.")
    tpl_state = await fake.wait_card_final("fail-tpl")
    assert tpl_state.failed and tpl_state.timeline[-1].is_error and tpl_state.timeline[-1].is_finalize
    assert tpl_state.final_content == "The AI service did not answer."
    builtin_state = await fake.wait_card_final("fail-builtin")
    assert builtin_state.flow_status == "5"
    assert builtin_state.failed
    assert builtin_state.final_content == "The AI service did not answer."


async def test_card_errors_carry_dingtalk_codes_and_are_not_retried(session):
    async with FakeDingTalk(ping_interval=None, max_stream_content=64) as fake:
        fake.register_app(CLIENT_ID, SECRET)
        api = make_api(fake, session)
        card = AICard(api, out_track_id="dup", template_id=TEMPLATE, message=one_to_one(fake))
        await card.open()
        with pytest.raises(CardAlreadyExists) as duplicate:  # what the card streamer accepts when resuming
            await card.open()
        assert duplicate.value.code == "param.cardAlreadyExist" and not duplicate.value.retryable
        with pytest.raises(DingTalkError) as too_large:
            await card.update("x" * 65)
        assert too_large.value.code == "param.stream.content"
        assert fake.calls[fd.API_CREATE_AND_DELIVER] == 2
        assert fake.calls[fd.API_CARD_STREAMING] == 1
        external = one_to_one(fake, sender_staff_id="")
        with pytest.raises(DingTalkError) as no_space:
            await AICard(api, out_track_id="ext", template_id=TEMPLATE, message=external).open()
        assert no_space.value.code == "param.openSpaceIdInvalid"


async def test_qps_refusals_are_retried_until_they_pass(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    card = AICard(api, out_track_id="qps", template_id=TEMPLATE, message=one_to_one(fake))
    await card.open()
    fake.fail_next(fd.API_CARD_STREAMING, 2, status=403, code=fd.QPS_LIMIT_CODE)
    fake.fail_next(fd.API_CARD_STREAMING, 1, status=429, code="TooManyRequests")
    await card.finish("made it")
    assert fake.calls[fd.API_CARD_STREAMING] == 4
    assert fake.cards["qps"].final_content == "made it"


async def test_retries_are_bounded(fake: FakeDingTalk, session):
    api = make_api(fake, session, max_attempts=3)
    card = AICard(api, out_track_id="bounded", template_id=TEMPLATE, message=one_to_one(fake))
    await card.open()
    fake.fail_next(fd.API_CARD_STREAMING, 3, status=403, code=fd.QPS_LIMIT_CODE)
    with pytest.raises(DingTalkRateLimited):
        await card.update("never")
    fake.fail_next(fd.API_CARD_STREAMING, 3, status=500, code="system.busy")
    with pytest.raises(DingTalkError) as busy:
        await card.update("never")
    assert busy.value.status == 500
    assert fake.calls[fd.API_CARD_STREAMING] == 6


async def test_a_create_that_failed_after_creating_is_not_an_error_on_retry(fake: FakeDingTalk, session):
    """A 5xx after DingTalk created the card makes the retry see cardAlreadyExist: that is success."""
    api = make_api(fake, session)
    message = one_to_one(fake)
    card = AICard(api, out_track_id="half", template_id=TEMPLATE, message=message)
    await card.open()
    again = AICard(api, out_track_id="half", template_id=TEMPLATE, message=message)
    fake.fail_next(fd.API_CREATE_AND_DELIVER, status=500)
    # The retry answers param.cardAlreadyExist, which here means the card exists: no error.
    await again.open()
    assert fake.calls[fd.API_CREATE_AND_DELIVER] == 3


async def test_a_peer_that_does_not_answer_is_unavailable(fake: FakeDingTalk, session):
    api = make_api(fake, session, timeout=0.2)
    card = AICard(api, out_track_id="slow", template_id=TEMPLATE, message=one_to_one(fake))
    await card.open()
    fake.fail_next(fd.API_CARD_STREAMING, status=200, body={"success": True}, delay=2.0)
    with pytest.raises(DingTalkUnavailable):
        await card.update("late")


async def test_an_unreachable_peer_is_unavailable(session):
    api = DingTalkApi(client_id=CLIENT_ID, client_secret=Secret(SECRET), session=session,
                      api_base="http://127.0.0.1:9")
    with pytest.raises(DingTalkUnavailable) as raised:
        await api.access_token()
    assert SECRET not in str(raised.value)


async def test_the_stream_gateway_is_not_followed_through_a_redirect(session):
    """The gateway open request carries the app's secret: a redirect elsewhere must not take it along."""
    elsewhere: list[bytes] = []

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"http://127.0.0.1:{port}/elsewhere"})

    async def catch(request: web.Request) -> web.Response:
        elsewhere.append(await request.read())
        return web.json_response({"endpoint": "ws://127.0.0.1:9/", "ticket": "t"})

    app = web.Application()
    app.router.add_post("/v1.0/gateway/connections/open", redirect)
    app.router.add_post("/elsewhere", catch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        connection = StreamConnection(client_id=CLIENT_ID, client_secret=Secret(SECRET),
                                      api_base=f"http://127.0.0.1:{port}", session=session,
                                      on_message=lambda message: None, open_timeout=5.0)
        with pytest.raises(DingTalkError) as refused:
            await connection.check_gateway()
        assert refused.value.status == 307 and elsewhere == []
    finally:
        await runner.cleanup()


async def test_without_pacing_the_fake_does_refuse_a_burst(fake: FakeDingTalk, session):
    """The fake's limit is real: what the card-call scheduler (test_delivery.py) keeps the bot under."""
    api = make_api(fake, session, max_attempts=1)
    cards = [AICard(api, out_track_id=f"raw-{i}", template_id=TEMPLATE, message=one_to_one(fake))
             for i in range(25)]
    results = await asyncio.gather(*(card.open() for card in cards), return_exceptions=True)
    refused = [r for r in results if isinstance(r, DingTalkRateLimited)]
    assert refused
    assert fake.qps_rejections[fd.API_CREATE_AND_DELIVER] == len(refused)


# --- webhook replies, files ---------------------------------------------------------------------------------


async def test_webhook_markdown_reply_is_recorded(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    message = parse_incoming(fake.make_text_message("q", group=True, sender_staff_id="staff7"))
    await api.reply_via_webhook(message.session_webhook, title="Answer", markdown="**hi** @staff7",
                                at_user_ids=["staff7"])
    (reply,) = await fake.wait_webhook_replies(1)
    assert reply.body == {"msgtype": "markdown", "markdown": {"title": "Answer", "text": "**hi** @staff7"},
                          "at": {"atUserIds": ["staff7"]}}


async def test_webhook_errcode_is_a_failure(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    message = parse_incoming(fake.make_text_message("q"))
    fake.expire_session(message.session_webhook)
    with pytest.raises(DingTalkError) as expired:
        await api.reply_via_webhook(message.session_webhook, title="t", markdown="m")
    assert expired.value.code == "300002"
    assert "session=" not in str(expired.value)
    assert fake.webhook_replies == []


async def test_message_files_download_and_media_upload(fake: FakeDingTalk, session):
    api = make_api(fake, session)
    code = fake.add_file(b"picture bytes", content_type="image/png")
    assert await api.download_message_file(download_code=code, robot_code=CLIENT_ID) == b"picture bytes"
    media_id = await api.upload_media(b"\x89PNG...", filename="a.png", content_type="image/png")
    (uploaded,) = fake.uploaded_media
    assert uploaded.media_id == media_id
    assert uploaded.data == b"\x89PNG..."
    assert uploaded.media_type == "image"


async def test_no_secret_token_or_session_in_the_logs(fake: FakeDingTalk, session, caplog):
    caplog.set_level(logging.DEBUG)
    recorder = Recorder()
    api = make_api(fake, session)
    async with running(make_connection(fake, session, recorder)):
        await fake.wait_connections(1)
        data = fake.make_text_message("secret question")
        await fake.wait_ack(fake.push_message(CLIENT_ID, data))
        message = recorder.messages[0]
        card = AICard(api, out_track_id="logs", template_id=TEMPLATE, message=message)
        await card.open()
        fake.revoke_tokens()
        await card.finish("secret answer")
        await api.reply_via_webhook(message.session_webhook, title="t", markdown="m")
    token = await api.access_token()
    session_id = message.session_webhook.rsplit("=", 1)[1]
    for forbidden in (SECRET, token, session_id):
        assert forbidden not in caplog.text
    visible = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "secret answer" not in visible
