"""DifyClient against the loopback fake Dify (and, for what the fake never does, tiny loopback servers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dingdifyd.config import Secret
from dingdifyd.dify.client import DifyClient, DifyTimeouts
from dingdifyd.dify.events import (
    AgentThought,
    DifyEvent,
    MessageEnd,
    MessageFile,
    TextDelta,
    TextReplace,
    WorkflowFinished,
    text_from_outputs,
)
from dingdifyd.errors import (
    ConversationNotFound,
    DifyAuthError,
    DifyError,
    DifyRateLimited,
    DifyStreamCut,
    DifyTimeout,
    DifyUnavailable,
)
from dingdifyd.simulator.dify import ANSWER_TAIL, FakeDify

APP_TYPES = ["chatbot", "agent", "chatflow", "workflow", "completion"]
MODE_OF = {
    "chatbot": "chat",
    "agent": "agent-chat",
    "chatflow": "advanced-chat",
    "workflow": "workflow",
    "completion": "completion",
}
USER = "dingtalk:corp1:staff1"
QUICK = DifyTimeouts(connect=2, first_byte=5, idle=5)


def key_of(app_type: str) -> str:
    return f"app-test-{app_type}-{'x' * 12}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDify]:
    fake = FakeDify(ping_interval=10)
    for app_type, mode in MODE_OF.items():
        fake.add_app(key_of(app_type), mode, name=f"test-{app_type}", token_delay=0.001)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def client_for(
    fake: FakeDify | str,
    session: aiohttp.ClientSession,
    app_type: str,
    timeouts: DifyTimeouts = QUICK,
    **kw: Any,
) -> DifyClient:
    base_url = fake.base_url if isinstance(fake, FakeDify) else fake
    api_key = Secret(kw.pop("api_key", key_of(app_type)))
    return DifyClient(base_url=base_url, api_key=api_key, app_type=app_type, session=session, timeouts=timeouts, **kw)


async def collect(client: DifyClient, query: str = "Hello Dify", **kwargs: Any) -> list[DifyEvent]:
    return [event async for event in client.stream_answer(query=query, user=kwargs.pop("user", USER), **kwargs)]


def answer_of(events: list[DifyEvent]) -> str:
    text = ""
    for event in events:
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, TextReplace):
            text = event.text
        elif isinstance(event, WorkflowFinished) and not text:
            text = text_from_outputs(event.outputs)
    return text


def echo(query: str) -> str:
    return f"Echo: {query} | {ANSWER_TAIL}"


# --- every app type -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("app_type", APP_TYPES)
async def test_each_app_type_streams_the_full_answer(
    fake: FakeDify, session: aiohttp.ClientSession, app_type: str
) -> None:
    client = client_for(fake, session, app_type)
    events = await collect(client, "Hello Dify", inputs={"topic": "bridge"})
    assert answer_of(events) == echo("Hello Dify")
    terminal = WorkflowFinished if app_type == "workflow" else MessageEnd
    assert isinstance(events[-1], terminal)
    assert sum(isinstance(e, terminal) for e in events) == 1
    assert all(e.task_id == events[-1].task_id for e in events)


@pytest.mark.parametrize(
    ("app_type", "path", "body"),
    [
        (
            "chatbot",
            "/v1/chat-messages",
            {
                "inputs": {"topic": "t"},
                "query": "Hi",
                "response_mode": "streaming",
                "user": USER,
                "auto_generate_name": False,
            },
        ),
        (
            "completion",
            "/v1/completion-messages",
            {
                "inputs": {"topic": "t", "query": "Hi"},
                "query": "Hi",
                "response_mode": "streaming",
                "user": USER,
            },
        ),
        (
            "workflow",
            "/v1/workflows/run",
            {"inputs": {"topic": "t", "query": "Hi"}, "response_mode": "streaming", "user": USER},
        ),
    ],
)
async def test_request_path_and_body_per_app_type(
    fake: FakeDify, session: aiohttp.ClientSession, app_type: str, path: str, body: dict[str, Any]
) -> None:
    await collect(client_for(fake, session, app_type), "Hi", inputs={"topic": "t"})
    request = fake.requests[-1]
    assert request.path == path
    assert request.json == body
    assert request.headers["Content-Type"] == "application/json"
    assert list(request.json) == list(body)  # key order too: the wire body reads like Dify's docs


async def test_workflow_input_variable_is_configurable(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    form = [{"paragraph": {"label": "Question", "variable": "question", "required": True, "max_length": 100}}]
    fake.add_app("app-question-form", "workflow", user_input_form=form, token_delay=0)
    client = client_for(fake, session, "workflow", api_key="app-question-form", input_variable="question")
    events = await collect(client, "What now?")
    assert answer_of(events) == echo("What now?")
    assert fake.requests[-1].json["inputs"] == {"question": "What now?"}


# --- conversations ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("app_type", ["chatbot", "agent", "chatflow"])
async def test_second_turn_continues_the_conversation(
    fake: FakeDify, session: aiohttp.ClientSession, app_type: str
) -> None:
    fake.configure(key_of(app_type), mention_turn=True)
    client = client_for(fake, session, app_type)
    first = await collect(client, "first question")
    conversation_id = first[-1].conversation_id
    assert uuid.UUID(conversation_id)
    assert "conversation_id" not in fake.requests[-1].json  # a new conversation: none sent

    second = await collect(client, "second question", conversation_id=conversation_id)
    assert {e.conversation_id for e in second} == {conversation_id}
    assert "Turn 2 of this conversation" in answer_of(second)
    assert fake.requests[-1].json["conversation_id"] == conversation_id
    assert fake.conversations[conversation_id].queries == ["first question", "second question"]


async def test_unknown_conversation_is_conversation_not_found(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    client = client_for(fake, session, "chatbot")
    with pytest.raises(ConversationNotFound) as caught:
        await collect(client, conversation_id=str(uuid.uuid4()))
    assert caught.value.status == 404 and caught.value.code == "not_found"


async def test_conversation_of_another_user_is_not_found(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    client = client_for(fake, session, "chatflow")
    conversation_id = (await collect(client, user="alice"))[-1].conversation_id
    with pytest.raises(ConversationNotFound):
        await collect(client, user="bob", conversation_id=conversation_id)


async def test_newer_dify_conversation_error_with_route_hints_is_still_recognised(
    session: aiohttp.ClientSession,
) -> None:
    async with FakeDify(conversation_error_suffix=True) as fake:
        fake.add_app(key_of("chatbot"), "chat")
        with pytest.raises(ConversationNotFound) as caught:
            await collect(client_for(fake, session, "chatbot"), conversation_id=str(uuid.uuid4()))
    assert "You have requested this URI" in str(caught.value)


# --- errors before the stream -------------------------------------------------------------------------------


async def test_bad_key_is_an_auth_error_that_does_not_show_the_key(
    fake: FakeDify, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = client_for(fake, session, "chatbot", api_key="app-wrong-secret-key")
    with pytest.raises(DifyAuthError) as caught:
        await collect(client)
    assert caught.value.status == 401 and caught.value.code == "unauthorized"
    assert "app-wrong-secret-key" not in str(caught.value) + repr(client) + caplog.text


async def test_http_500_before_the_stream(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.next_request(key_of("chatbot"), http_500=True)
    client = client_for(fake, session, "chatbot")
    with pytest.raises(DifyError) as caught:
        await collect(client)
    assert type(caught.value) is DifyError
    assert caught.value.status == 500 and caught.value.code == "internal_server_error"
    assert answer_of(await collect(client)) == echo("Hello Dify")  # only the next request failed


async def test_wrong_app_type_names_the_route_mismatch(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    client = client_for(fake, session, "chatbot", api_key=key_of("workflow"))
    with pytest.raises(DifyError) as caught:
        await collect(client)
    assert caught.value.code == "not_chat_app" and caught.value.status == 400


async def test_missing_required_input_names_the_variable(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    client = client_for(fake, session, "workflow", input_variable="text")
    with pytest.raises(DifyError) as caught:
        await collect(client)
    assert str(caught.value) == "query is required in input form"


async def test_too_many_streams_is_rate_limited(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key_of("chatbot"), max_active_streams=1, token_delay=0.05)
    client = client_for(fake, session, "chatbot")
    first = client.stream_answer(query="one", user=USER)
    try:
        assert isinstance(await anext(first), TextDelta)
        with pytest.raises(DifyRateLimited) as caught:
            await collect(client, "two")
        assert caught.value.status == 429 and caught.value.code == "too_many_requests"
    finally:
        await first.aclose()


# --- errors inside the stream -------------------------------------------------------------------------------


async def test_in_stream_error_event_raises_after_the_text_so_far(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    fake.configure(key_of("chatbot"), error_after=3)
    received: list[DifyEvent] = []
    with pytest.raises(DifyError) as caught:
        async for event in client_for(fake, session, "chatbot").stream_answer(query="Hello Dify", user=USER):
            received.append(event)
    assert answer_of(received) == "Echo: Hello Dify"
    assert caught.value.code == "completion_request_error" and caught.value.status == 400
    assert "fake upstream failure" in str(caught.value)


@pytest.mark.parametrize("app_type", ["chatflow", "workflow", "agent", "completion"])
async def test_upstream_failure_raises_for_every_app_type(
    fake: FakeDify, session: aiohttp.ClientSession, app_type: str
) -> None:
    with pytest.raises(DifyError) as caught:
        await collect(client_for(fake, session, app_type), "please fail500 now")
    assert "fake upstream failure" in str(caught.value)


async def test_stall_is_an_idle_timeout(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key_of("chatbot"), stall_after=2)
    client = client_for(fake, session, "chatbot", DifyTimeouts(connect=2, first_byte=5, idle=0.3))
    received: list[DifyEvent] = []
    with pytest.raises(DifyTimeout) as caught:
        async for event in client.stream_answer(query="Hello Dify", user=USER):
            received.append(event)
    assert answer_of(received) == "Echo: Hello"
    assert "0.3" in str(caught.value)


@pytest.mark.parametrize("fault", ["cut_after", "end_after"])
async def test_stream_without_terminal_event_is_cut(fake: FakeDify, session: aiohttp.ClientSession, fault: str) -> None:
    fake.configure(key_of("chatflow"), **{fault: 4})
    received: list[DifyEvent] = []
    with pytest.raises(DifyStreamCut):
        async for event in client_for(fake, session, "chatflow").stream_answer(query="Hello Dify", user=USER):
            received.append(event)
    assert answer_of(received) == "Echo: Hello Dify |"


async def test_workflow_failure_is_an_error_even_without_an_error_event(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    fake.configure(key_of("workflow"), error_after=2)
    with pytest.raises(DifyError) as caught:
        await collect(client_for(fake, session, "workflow"))
    assert caught.value.code == "workflow_failed"


# --- the shape of the stream --------------------------------------------------------------------------------


async def test_pings_never_break_a_stream_and_keep_it_alive(session: aiohttp.ClientSession) -> None:
    async with FakeDify(ping_interval=0.03) as fake:
        fake.add_app(key_of("chatbot"), "chat", token_delay=0.35, answer="still alive")
        url = fake.base_url + "/chat-messages"
        body = {"inputs": {}, "query": "q", "user": USER, "response_mode": "streaming"}
        headers = {"Authorization": f"Bearer {key_of('chatbot')}"}
        async with session.post(url, json=body, headers=headers) as response:
            raw = await response.read()
        assert raw.count(b"event: ping\n\n") >= 5  # they interleave with the answer, as in Dify

        # each gap between two answer events (0.35 s) is longer than the idle timeout; only pings bridge it
        client = client_for(fake, session, "chatbot", DifyTimeouts(connect=2, first_byte=5, idle=0.2))
        events = await collect(client)
    assert answer_of(events) == "still alive"
    assert isinstance(events[-1], MessageEnd)


async def test_stream_ends_at_message_end_without_waiting_for_eof(session: aiohttp.ClientSession) -> None:
    async with FakeDify() as fake:
        # Dify keeps the socket open after message_end while it generates a title
        fake.add_app(key_of("chatbot"), "chat", token_delay=0, hold_open_after_end=30)
        client = client_for(fake, session, "chatbot", DifyTimeouts(connect=2, first_byte=5, idle=0.3))
        events = await collect(client)
    assert isinstance(events[-1], MessageEnd)
    assert answer_of(events) == echo("Hello Dify")


async def test_chatflow_reads_past_workflow_finished_to_message_end(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    events = await collect(client_for(fake, session, "chatflow"))
    names = [e.event for e in events]
    assert names[-2:] == ["workflow_finished", "message_end"]
    assert names[:4] == ["workflow_started", "node_started", "node_finished", "node_started"]


async def test_workflow_without_text_chunks_gives_outputs(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key_of("workflow"), workflow_streams_text=False)
    events = await collect(client_for(fake, session, "workflow"))
    assert not any(isinstance(e, TextDelta) for e in events)
    finished = events[-1]
    assert isinstance(finished, WorkflowFinished) and finished.status == "succeeded"
    assert finished.outputs["answer"] == echo("Hello Dify")
    assert text_from_outputs(finished.outputs) == echo("Hello Dify")


async def test_message_replace_and_message_file(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key_of("chatbot"), replace_with="[moderated]", message_file=True)
    events = await collect(client_for(fake, session, "chatbot"))
    assert answer_of(events) == "[moderated]"
    files = [e for e in events if isinstance(e, MessageFile)]
    assert len(files) == 1 and files[0].file_type == "image" and files[0].belongs_to == "assistant"
    assert files[0].url.startswith("/files/tools/") and "sign=" in files[0].url
    async with session.get(fake.public_url + files[0].url) as response:
        assert response.status == 200
        assert (await response.read()).startswith(b"\x89PNG")


async def test_agent_tool_thoughts(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key_of("agent"), agent_tool="current_time")
    events = await collect(client_for(fake, session, "agent"))
    thoughts = [e for e in events if isinstance(e, AgentThought)]
    assert any(t.tool == "current_time" and t.observation for t in thoughts)
    assert answer_of(events).startswith("Tool said: ")


@pytest.mark.parametrize(
    ("app_type", "last_events"),
    [
        ("chatbot", ["message_end"]),
        ("chatflow", ["workflow_finished"]),  # stopped: its end (0.15.3's message_end after it is not read)
        ("workflow", ["workflow_finished"]),
        ("completion", ["message_end"]),
    ],
)
async def test_stop_ends_a_running_stream(
    fake: FakeDify, session: aiohttp.ClientSession, app_type: str, last_events: list[str]
) -> None:
    fake.configure(key_of(app_type), slow_token_delay=0.02)
    client = client_for(fake, session, app_type)
    events: list[DifyEvent] = []
    async for event in client.stream_answer(query="tell me something slow", user=USER):
        events.append(event)
        if isinstance(event, TextDelta) and len(answer_of(events)) > 5 and not fake.stops:
            await client.stop(event.task_id, USER)
    assert [e.event for e in events[-len(last_events) :]] == last_events
    assert fake.stops and fake.stops[0].found and fake.stops[0].user == USER
    assert 0 < len(answer_of(events).split()) < 42  # the forty slow words never all arrived
    if app_type in ("workflow", "chatflow"):
        assert next(e for e in events if isinstance(e, WorkflowFinished)).status == "stopped"


# --- other calls --------------------------------------------------------------------------------------------


async def test_info_and_parameters(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    client = client_for(fake, session, "workflow")
    assert (await client.info())["name"] == "test-workflow"
    form = (await client.parameters())["user_input_form"]
    assert form[0]["text-input"]["variable"] == "query"
    assert (await client.version())["server_version"] == "0.15.3"


async def test_upload_then_send_the_file(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    client = client_for(fake, session, "chatbot")
    uploaded = await client.upload_file(data=b"\x89PNG fake", filename="pic.png", mime_type="image/png", user=USER)
    assert fake.uploads[uploaded["id"]].data == b"\x89PNG fake"
    assert uploaded["extension"] == "png" and uploaded["size"] == 9
    files = [{"type": "image", "transfer_method": "local_file", "upload_file_id": uploaded["id"]}]
    events = await collect(client, "What is in this picture?", files=files)
    assert answer_of(events) == echo("What is in this picture?")
    assert fake.requests[-1].json["files"] == files


async def test_stop_of_another_users_task_does_nothing(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key_of("chatbot"), token_delay=0.01)
    client = client_for(fake, session, "chatbot")
    events: list[DifyEvent] = []
    async for event in client.stream_answer(query="Hello Dify", user=USER):
        events.append(event)
        if not fake.stops:
            await client.stop(event.task_id, "someone-else")
    assert answer_of(events) == echo("Hello Dify")
    assert fake.stops[0].found is False


# --- what only a broken peer does: tiny loopback servers ----------------------------------------------------


@contextlib.asynccontextmanager
async def serve(handler: Any) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_html_error_from_a_proxy(session: aiohttp.ClientSession) -> None:
    async def bad_gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")

    async with serve(bad_gateway) as base_url:
        with pytest.raises(DifyError) as caught:
            await collect(client_for(base_url, session, "chatbot"))
        with pytest.raises(DifyError):
            await client_for(base_url, session, "chatbot").info()
    assert caught.value.status == 502 and caught.value.code is None
    assert "502" in str(caught.value) and "text/html" in str(caught.value)


async def test_malformed_data_line_is_skipped(session: aiohttp.ClientSession) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        await response.write(b'data: {"event": "message", "answer": "A"}\n\n')
        await response.write(b"data: {not json\n\n")
        await response.write(b'data: ["a list"]\n\n')
        await response.write(b'data: {"event": "some_future_event"}\n\n')
        await response.write(b'data: {"event": "message", "answer": "B"}\n\n')
        await response.write(b'data: {"event": "message_end", "metadata": {}}\n\n')
        return response

    async with serve(stream) as base_url:
        events = await collect(client_for(base_url, session, "chatbot"))
    assert answer_of(events) == "AB"
    assert [e.event for e in events] == ["message", "some_future_event", "message", "message_end"]


async def test_json_answer_where_a_stream_was_expected(session: aiohttp.ClientSession) -> None:
    async def blocking(request: web.Request) -> web.Response:
        return web.json_response({"event": "message", "answer": "blocking"})

    async with serve(blocking) as base_url:
        with pytest.raises(DifyError) as caught:
            await collect(client_for(base_url, session, "chatbot"))
    assert "not an event stream" in str(caught.value)


async def test_no_response_headers_is_a_first_byte_timeout(session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    async with serve(silent) as base_url:
        client = client_for(base_url, session, "chatbot", DifyTimeouts(connect=2, first_byte=0.2, idle=5))
        try:
            with pytest.raises(DifyTimeout) as caught:
                await collect(client)
        finally:
            release.set()
    assert "response headers" in str(caught.value)


async def test_connection_refused_is_unavailable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = client_for(f"http://127.0.0.1:{port}/v1", session, "chatbot")
    with pytest.raises(DifyUnavailable):
        await collect(client)
    with pytest.raises(DifyUnavailable):
        await client.parameters()


def test_unknown_app_type_is_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="app_type"):
        client_for("http://127.0.0.1:1/v1", session, "assistant")
    with pytest.raises(ValueError, match="resolve_app_type"):
        client_for("http://127.0.0.1:1/v1", session, "auto").request_for(query="q", user="u")


async def test_no_key_and_no_text_in_logs(
    fake: FakeDify, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.configure(key_of("chatbot"), error_after=5)
    with pytest.raises(DifyError):
        await collect(client_for(fake, session, "chatbot"), "my very private question")
    assert key_of("chatbot") not in caplog.text
    info_and_up = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "private" not in info_and_up


async def test_one_shot_behaviour_survives_a_refused_request(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.next_request(key_of("chatbot"), error_after=1)
    client = client_for(fake, session, "chatbot")
    with pytest.raises(ConversationNotFound):  # like the bridge's stale conversation, retried as a new one
        await collect(client, conversation_id=str(uuid.uuid4()))
    with pytest.raises(DifyError, match="fake upstream failure"):
        await collect(client)
    assert answer_of(await collect(client)) == echo("Hello Dify")


@pytest.mark.parametrize("info_with_mode", [False, True])
@pytest.mark.parametrize("app_type", APP_TYPES)
async def test_auto_app_type_is_resolved_from_the_server(
    session: aiohttp.ClientSession, app_type: str, info_with_mode: bool
) -> None:
    async with FakeDify(info_with_mode=info_with_mode) as fake:
        fake.add_app(key_of(app_type), MODE_OF[app_type], token_delay=0)
        client = client_for(fake, session, "auto", api_key=key_of(app_type))
        events = await collect(client)
        generations = [r for r in fake.requests if r.json and "query" in str(r.json) and "probe" not in str(r.json)]
    assert answer_of(events) == echo("Hello Dify")
    if info_with_mode:  # Dify 1.x: the exact type, from GET /info alone
        assert client.app_type == app_type
        assert not any("probe" in str(r.json) for r in fake.requests)
    else:  # 0.15.3: probing the routes tells the chat family, completion and workflow apart
        assert client.app_type == ("chatbot" if app_type in ("chatbot", "agent", "chatflow") else app_type)
    assert len(generations) == 1


async def test_auto_with_a_bad_key_is_an_auth_error(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    with pytest.raises(DifyAuthError):
        await collect(client_for(fake, session, "auto", api_key="app-unknown"))


# --- files Dify serves: its own origin only ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def files_host(handler: Any) -> AsyncIterator[str]:
    """A loopback host serving /files/...: its origin (http://127.0.0.1:port)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_file_redirect_to_another_origin_is_not_followed(session: aiohttp.ClientSession) -> None:
    reached: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.Response(body=b"instance credentials", content_type="text/plain")

    async with files_host(internal) as internal_origin:
        async def dify_files(request: web.Request) -> web.Response:
            if request.path == "/files/tools/same.png":
                raise web.HTTPFound("/files/tools/moved.png")  # a redirect within Dify's origin is fine
            if request.path == "/files/tools/moved.png":
                return web.Response(body=b"png bytes", content_type="image/png")
            raise web.HTTPFound(f"{internal_origin}/latest/meta-data")

        async with files_host(dify_files) as dify_origin:
            client = client_for(f"{dify_origin}/v1", session, "chatbot")
            data, content_type = await client.fetch_file(f"{dify_origin}/files/tools/same.png?sign=1")
            assert (data, content_type) == (b"png bytes", "image/png")
            with pytest.raises(DifyError) as refused:
                await client.fetch_file(f"{dify_origin}/files/tools/away.png?sign=1")
            with pytest.raises(DifyError):
                await client.fetch_file(f"{internal_origin}/files/tools/direct.png")  # not Dify's origin at all
    assert reached == []  # the internal host was never asked
    assert refused.value.code == "redirect_refused"
