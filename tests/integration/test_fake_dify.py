"""The fake Dify answers the recorded requests the way the real Dify 0.15.3 did: the same bytes where
nothing varies, the same event sequence and key order where ids and timings do."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import pytest

from dingdifyd.config import Secret
from dingdifyd.dify.client import DifyClient
from dingdifyd.errors import DifyStreamCut
from dingdifyd.simulator.dify import FakeDify, running_fake_dify, start_fake_dify
from tests.support.transcripts import DIFY_0_15_FIXTURES, chunks_of, recorded_answer, shape

FIXTURES = DIFY_0_15_FIXTURES
recorded = partial(recorded_answer, FIXTURES)
RECORDED_KEY = "app-REDACTEDREDACTEDREDACT"
KEYS = {mode: f"app-fake-{mode}" for mode in ("chat", "agent-chat", "advanced-chat", "workflow", "completion")}
MODE_OF_TYPE = {
    "chatbot": "chat",
    "agent": "agent-chat",
    "chatflow": "advanced-chat",
    "workflow": "workflow",
    "completion": "completion",
}
WORKFLOW_FORM = [
    {"text-input": {"label": "query", "variable": "query", "required": True, "max_length": 256}},
    {"file": {"label": "doc", "variable": "doc", "required": False}},
]


def mode_of(case: str) -> str:
    """Which app the capture used for a case (see the transcripts' README)."""
    if case.startswith("33"):
        return "workflow"
    return {"6": "agent-chat", "7": "completion", "8": "workflow", "9": "advanced-chat"}.get(case[0], "chat")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDify]:
    fake = FakeDify()
    fake.add_app(KEYS["chat"], "chat", name="chat-echo", description="local test chat app", token_delay=0)
    fake.add_app(KEYS["agent-chat"], "agent-chat", token_delay=0)
    fake.add_app(KEYS["advanced-chat"], "advanced-chat", token_delay=0)
    fake.add_app(KEYS["workflow"], "workflow", user_input_form=WORKFLOW_FORM, token_delay=0)
    fake.add_app(KEYS["completion"], "completion", token_delay=0)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


async def replay(
    fake: FakeDify, session: aiohttp.ClientSession, case: str, **body_changes: Any
) -> tuple[int, dict[str, str], bytes]:
    """Send the recorded request of `case` to the fake, with the key of the same kind of app."""
    head, _, body = (FIXTURES / f"{case}.request.txt").read_text().partition("\n\n")
    request_line, *header_lines = head.splitlines()
    method, url = request_line.split()
    headers = dict(line.split(": ", 1) for line in header_lines)
    if headers.get("Authorization") == f"Bearer {RECORDED_KEY}":
        headers["Authorization"] = f"Bearer {KEYS[mode_of(case)]}"
    data = body.strip().encode()
    if body_changes:
        data = json.dumps(json.loads(data) | body_changes).encode()
    path = url.split("/v1", 1)[1]
    async with session.request(method, fake.base_url + path, data=data, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VARYING = re.compile(rb'"(created_at|finished_at|latency|elapsed_time|sequence_number)": [0-9.eE-]+')


def normalized(raw: bytes) -> bytes:
    """Ids, timestamps and timings differ from run to run; everything else must not."""
    return _VARYING.sub(rb'"\1": 0', _UUID.sub(b"<uuid>", raw))


# --- byte for byte ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "24-chat-stream-nonuuid-conversation",
        "23-chat-stream-bogus-conversation",
        "94-chatflow-bogus-conversation",
        "26-chat-missing-query",
        "27-chat-missing-inputs",
        "28-chat-missing-user",
        "29-chat-bad-api-key",
        "30-chat-no-auth-header",
        "33-chat-workflow-key-on-chat-endpoint",
        "34-chat-bad-response-mode",
        "62-agent-blocking",
        "72-completion-missing-input-query",
        "74-completion-key-on-chat-endpoint",
        "82-workflow-missing-required-input",
        "88-workflow-key-on-completion-endpoint",
        "36-chat-stream-stopped-stop",
        "75-completion-stream-stopped-stop",
        "87-workflow-stream-stopped-stop",
        "96-chatflow-stream-stopped-stop",
        "51-info",
    ],
)
async def test_json_answers_are_byte_identical(fake: FakeDify, session: aiohttp.ClientSession, case: str) -> None:
    status, headers, body = await replay(fake, session, case)
    expected_status, expected_body = recorded(case)
    assert (status, body) == (expected_status, expected_body)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Version"] == "0.15.3"


@pytest.mark.parametrize("case", ["20-chat-stream-new", "32-chat-upstream-llm-500"])
async def test_chat_stream_is_byte_identical_but_for_ids_and_timings(
    fake: FakeDify, session: aiohttp.ClientSession, case: str
) -> None:
    status, headers, body = await replay(fake, session, case)
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Transfer-Encoding"] == "chunked"
    assert headers["X-Version"] == "0.15.3"
    assert normalized(body) == normalized(recorded(case)[1])


@pytest.mark.parametrize(
    "case",
    [
        "20-chat-stream-new",
        "31-chat-with-image-file",
        "61-agent-stream-continue",
        "70-completion-stream",
        "80-workflow-stream",
        "86-workflow-llm-500",
        "90-chatflow-stream-new",
        "93-chatflow-with-image",
        "95-chatflow-llm-500",
    ],
)
async def test_stream_has_the_recorded_events_and_key_order(
    fake: FakeDify, session: aiohttp.ClientSession, case: str
) -> None:
    changes: dict[str, Any] = {}
    body = json.loads((FIXTURES / f"{case}.request.txt").read_text().partition("\n\n")[2])
    if "files" in body:  # the recorded upload ids are not ours: upload a file of the same kind first
        form = aiohttp.FormData()
        form.add_field("user", "bridge-test-user")
        form.add_field("file", b"\x89PNG\r\n", filename="test.png", content_type="image/png")
        headers = {"Authorization": f"Bearer {KEYS[mode_of(case)]}"}
        async with session.post(fake.base_url + "/files/upload", data=form, headers=headers) as response:
            upload_id = (await response.json())["id"]
        changes["files"] = [file | {"upload_file_id": upload_id} for file in body["files"]]
    if "conversation_id" in body:  # a continued conversation: start one first
        _, _, first = await replay(fake, session, case, conversation_id="")
        changes["conversation_id"] = chunks_of(first)[0]["conversation_id"]
    status, _, raw = await replay(fake, session, case, **changes)
    assert status == 200
    ours, theirs = chunks_of(raw), chunks_of(recorded(case)[1])
    assert [c["event"] for c in ours] == [c["event"] for c in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        if mine["event"] in ("node_started", "node_finished") and "files" in body:
            continue  # the LLM node of a file-reading app records `#files#` inputs; ours never reads files
        assert shape(mine) == shape(real), mine["event"]
    assert normalized(raw).count(b", ") > 0 and b'":"' not in raw  # json.dumps separators, not orjson


async def test_non_ascii_is_escaped_like_json_dumps(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(KEYS["chat"], answer="你好 世界")
    _, _, raw = await replay(fake, session, "20-chat-stream-new")
    assert b"\\u4f60\\u597d" in raw
    assert all(byte < 0x80 for byte in raw)
    assert "".join(c.get("answer", "") for c in chunks_of(raw)) == "你好 世界"


@pytest.mark.parametrize(
    "case", ["22-chat-blocking", "35-chat-no-response-mode", "71-completion-blocking", "92-chatflow-blocking"]
)
async def test_blocking_answer_is_byte_identical_but_for_ids_and_timings(
    fake: FakeDify, session: aiohttp.ClientSession, case: str
) -> None:
    status, _, body = await replay(fake, session, case)
    assert status == 200
    if case.startswith("92"):  # the recorded chatflow's metadata differs only by its app's name in `mode`
        assert json.loads(body)["mode"] == "advanced-chat"
    assert normalized(body) == normalized(recorded(case)[1])


async def test_blocking_workflow_has_the_recorded_shape(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    status, _, body = await replay(fake, session, "81-workflow-blocking")
    assert status == 200
    answer = json.loads(body)
    assert shape(answer) == shape(json.loads(recorded("81-workflow-blocking")[1]))
    assert answer["data"]["outputs"] == json.loads(recorded("81-workflow-blocking")[1])["data"]["outputs"]


async def test_workflow_run_detail_like_the_recording(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    _, _, raw = await replay(fake, session, "80-workflow-stream")
    run_id = chunks_of(raw)[0]["workflow_run_id"]
    headers = {"Authorization": f"Bearer {KEYS['workflow']}"}
    async with session.get(f"{fake.base_url}/workflows/run/{run_id}", headers=headers) as response:
        detail = await response.json()
    expected = json.loads(recorded("84-workflow-run-detail")[1])
    assert shape(detail) == shape(expected)
    assert json.loads(detail["outputs"]) == json.loads(expected["outputs"])
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d -0000", detail["created_at"])


@pytest.mark.parametrize(("case", "mode"), [("49-parameters", "chat"), ("98-chatflow-parameters", "advanced-chat")])
async def test_parameters_have_the_recorded_top_level_keys(
    fake: FakeDify, session: aiohttp.ClientSession, case: str, mode: str
) -> None:
    headers = {"Authorization": f"Bearer {KEYS[mode]}"}
    async with session.get(fake.base_url + "/parameters", headers=headers) as response:
        ours = await response.json()
    assert list(ours) == list(json.loads(recorded(case)[1]))
    assert ours["user_input_form"][0]["text-input"]["variable"] == "topic"


async def test_upload_answers_201_with_the_recorded_keys(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("user", "bridge-test-user")
    form.add_field("file", b"0123456789", filename="test.png", content_type="image/png")
    headers = {"Authorization": f"Bearer {KEYS['chat']}"}
    async with session.post(fake.base_url + "/files/upload", data=form, headers=headers) as response:
        status, body = response.status, await response.json()
    assert status == 201
    assert list(body) == list(json.loads(recorded("10-files-upload-png")[1]))
    assert (body["name"], body["size"], body["extension"], body["mime_type"]) == (
        "test.png",
        10,
        "png",
        "image/png",
    )
    assert fake.uploads[body["id"]].data == b"0123456789"
    assert fake.requests[-1].json == {"user": "bridge-test-user", "files": ["test.png"]}


async def test_version_probe_needs_no_key(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.base_url + "/") as response:
        assert await response.json() == {
            "welcome": "Dify OpenAPI",
            "api_version": "v1",
            "server_version": "0.15.3",
        }


async def test_requests_are_recorded_without_the_key(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    await replay(fake, session, "20-chat-stream-new")
    request = fake.requests[-1]
    assert request.path == "/v1/chat-messages" and request.app == "chat-echo"
    assert request.json["query"] == "Hello Dify, first turn"
    assert all(key.lower() != "authorization" for key in request.headers)
    assert KEYS["chat"] not in repr(request)


async def test_unknown_route_is_a_json_404(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.base_url + "/no-such-thing") as response:
        assert response.status == 404
        assert (await response.json())["code"] == "not_found"


async def test_the_fake_binds_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await FakeDify().start(host="0.0.0.0")


async def test_helper_starts_default_apps_on_loopback() -> None:
    async with running_fake_dify(default_apps=True) as fake:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", fake.base_url)
        assert sorted(fake.apps) == sorted(f"app-fake-{kind}" for kind in MODE_OF_TYPE)
        assert {app.mode for app in fake.apps.values()} == set(MODE_OF_TYPE.values())


async def test_close_ends_a_running_stream_at_once(session: aiohttp.ClientSession) -> None:
    fake = await start_fake_dify()
    fake.add_app("app-k", "chat", token_delay=30)
    client = DifyClient(base_url=fake.base_url, api_key=Secret("app-k"), app_type="chatbot", session=session)
    stream = client.stream_answer(query="hi", user="u")
    try:
        assert (await anext(stream)).event == "message"
        await fake.close()
        with pytest.raises(DifyStreamCut):
            await anext(stream)
    finally:
        await stream.aclose()


# --- a bounded database pool, as a stock Dify has ------------------------------------------------------------


async def burst(fake: FakeDify, people: int) -> list[int]:
    """`people` streaming questions at the same moment; the HTTP status each got."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def ask(index: int) -> int:
            body = {"inputs": {}, "query": "hello", "user": f"u{index}", "response_mode": "streaming"}
            headers = {"Authorization": f"Bearer {KEYS['chat']}"}
            async with session.post(f"{fake.base_url}/chat-messages", json=body, headers=headers) as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(ask(i) for i in range(people))))


async def test_an_exhausted_database_pool_hangs_then_fails_every_request_like_a_stock_dify():
    async with running_fake_dify(db_pool=40, db_pool_timeout=1.0) as fake:
        fake.add_app(KEYS["chat"], "chat", token_delay=0.05)
        statuses = await burst(fake, 50)  # every request holds one connection and waits for a second one
    # the first 40 took every connection and waited for their streams' in vain: a real Dify 0.15.3 answered
    # 0 of 50 such people; here most fail too (those that came last may get through once the first have failed)
    assert statuses.count(500) >= 30 and set(statuses) <= {200, 500}
    assert fake.db_pool_timeouts >= 30
    assert fake.max_db_in_use == 40


async def test_a_burst_the_pool_can_take_is_answered():
    async with running_fake_dify(db_pool=40, db_pool_timeout=5.0) as fake:
        fake.add_app(KEYS["chat"], "chat", token_delay=0.01)
        statuses = await burst(fake, 30)
    assert statuses == [200] * 30 and fake.db_pool_timeouts == 0
