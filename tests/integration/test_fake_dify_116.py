"""The fake Dify's 1.16.1 apps answer the recorded requests the way the real Dify 1.16.1 did
(tests/fixtures/dify-1.16.1): the same bytes where nothing varies, the same event sequence and key order where
ids, timings and the model's numbers do; human-input pauses, the form routes and the run events route too."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import pytest

from dingdifyd.simulator.dify import DIFY_1_16, FakeDify, HumanInputNode
from tests.support.transcripts import DIFY_1_16_FIXTURES, chunks_of, recorded_answer, shape

pytestmark = pytest.mark.timeout(30)

FIXTURES = DIFY_1_16_FIXTURES
recorded = partial(recorded_answer, FIXTURES)
RECORDED_KEY = "app-REDACTED"
USER = "alice"
CAPTURE = "dingdifyd 1.x capture"
LLM_CAPTURE = "dingdifyd 1.x capture (fake LLM)"
# the capture's apps (tests/fixtures/dify-1.16.1/README.md), keyed for the fake
APPS: dict[str, dict[str, Any]] = {
    "echo-chatflow": {"mode": "advanced-chat", "description": CAPTURE},
    "echo-workflow": {"mode": "workflow", "description": CAPTURE},
    "llm-chatflow": {"mode": "advanced-chat", "description": LLM_CAPTURE},
    "llm-chat": {"mode": "chat", "description": LLM_CAPTURE},
    "llm-agent": {"mode": "agent-chat", "description": LLM_CAPTURE},
    "llm-completion": {"mode": "completion", "description": LLM_CAPTURE},
    "llm-workflow": {"mode": "workflow", "description": LLM_CAPTURE},
    "hitl-workflow": {"mode": "workflow", "human_input": HumanInputNode()},
    "hitl-chatflow": {"mode": "advanced-chat", "human_input": HumanInputNode()},
    "hitl-timeout-workflow": {"mode": "workflow", "human_input": HumanInputNode(timeout=0)},
    "hitl-timeout-chatflow": {"mode": "advanced-chat", "human_input": HumanInputNode(timeout=0)},
}
QUERY = {"text-input": {"label": "query", "variable": "query", "required": True, "max_length": 256}}
FORMS: dict[str, list[dict[str, Any]]] = {  # the start nodes of the capture's apps (dsl/)
    "echo-workflow": [QUERY, {"file": {"label": "file", "variable": "file", "required": False}}],
    "llm-workflow": [QUERY],
    "hitl-workflow": [QUERY],
    "hitl-timeout-workflow": [QUERY],
    "llm-completion": [{"paragraph": {"label": "query", "variable": "query", "required": True}}],
}


def key(app: str) -> str:
    return f"app-{app}"


def app_of(case: str) -> str:
    """Which of the capture's apps a case used."""
    number = int(re.match(r"\d+", case).group())  # type: ignore[union-attr]
    if case.startswith("88b"):
        return "echo-chatflow"
    if case.startswith("33") or 80 <= number <= 90 or case.startswith(("02", "04", "11-")):
        return "echo-workflow"
    if 60 <= number <= 68:
        return "hitl-workflow"
    if number == 69:
        return "hitl-timeout-workflow"
    if number == 79:
        return "hitl-timeout-chatflow"
    if 70 <= number <= 78:
        return "hitl-chatflow"
    if number >= 140:
        return "llm-workflow"
    if number >= 130:
        return "llm-completion"
    if number >= 120:
        return "llm-agent"
    if number >= 110:
        return "llm-chat"
    if number >= 100:
        return "llm-chatflow"
    return "echo-chatflow"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDify]:
    fake = FakeDify(version=DIFY_1_16, ping_interval=0.2)
    for name, spec in APPS.items():
        form = FORMS.get(name, [] if name.startswith(("llm-", "hitl-")) else None)
        uploads = spec["mode"] in ("advanced-chat", "workflow")  # the capture's classic apps took no files
        fake.add_app(key(name), spec["mode"], name=name, description=spec.get("description", ""),
                     human_input=spec.get("human_input"), user_input_form=form, file_upload=uploads,
                     token_delay=0)  # fmt: skip
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def request_of(case: str) -> tuple[str, str, dict[str, str], bytes]:
    """The recorded request: method, path (after /v1), headers, body (curl's -H / -d lines)."""
    first, *lines = (FIXTURES / f"{case}.request.txt").read_text().rstrip("\n").split("\n")
    method, url = first.split()
    headers: dict[str, str] = {}
    body = b""
    position = 0
    while position < len(lines):
        line = lines[position]
        if line == "-H":
            name, _, value = lines[position + 1].partition(": ")
            headers[name] = value
            position += 2
        elif line == "-d":
            body = lines[position + 1].encode()
            position += 2
        elif ": " in line:
            name, _, value = line.partition(": ")
            headers[name] = value
            position += 1
        else:
            position += 1
    return method, url.split("/v1", 1)[1], headers, body


async def replay(
    fake: FakeDify, session: aiohttp.ClientSession, case: str, *, path: str | None = None, **body_changes: Any
) -> tuple[int, dict[str, str], bytes]:
    method, recorded_path, headers, body = request_of(case)
    if headers.get("Authorization") == f"Bearer {RECORDED_KEY}":
        headers["Authorization"] = f"Bearer {key(app_of(case))}"
    if body_changes:
        body = json.dumps({**json.loads(body), **body_changes}).encode()
    async with session.request(method, fake.base_url + (path or recorded_path), data=body, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def sequence(chunks: list[dict[str, Any]]) -> list[str]:
    """Event names, runs of the same name counted once (token counts differ with the text)."""
    names: list[str] = []
    for chunk in chunks:
        if not names or names[-1] != chunk["event"]:
            names.append(chunk["event"])
    return names


_FORM_ID = re.compile(rb"form_id=[0-9a-f-]{36}")
_TOKEN = re.compile(rb"human_input\\?/[A-Za-z0-9]+\]")


def normalized(raw: bytes) -> bytes:
    return _TOKEN.sub(b"human_input/T]", _FORM_ID.sub(b"form_id=F", raw))


# --- byte for byte ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "01-info", "02-info-workflow", "100-llm-info-chatflow", "110-llm-info-chat", "120-llm-info-agent",
        "130-llm-info-completion", "140-llm-info-workflow", "12-files-upload-nofile",
        "23-chatflow-bogus-conversation", "25-chatflow-conversation-of-other-user",
        "105b-llm-chatflow-fail500-blocking", "116b-llm-chat-fail500-blocking", "114-llm-chat-suggested-questions",
        "125-llm-agent-stream-stopped-stop", "135-llm-completion-stream-stopped-stop",
        "24-chatflow-nonuuid-conversation", "29-chat-bad-api-key", "30-chat-no-auth-header",
        "31-chat-missing-query", "32-chat-missing-user", "33-chat-workflow-key-on-chat-endpoint",
        "34-chat-bad-response-mode", "35b-chat-missing-inputs", "36-chatflow-stream-stopped-stop",
        "37-chat-stop-unknown-task", "48-suggested-questions", "88b-chat-key-on-workflow-endpoint",
        "90-workflow-run-detail-bogus", "123-llm-agent-blocking-400", "134-llm-completion-missing-input",
        "136-llm-completion-on-chat-endpoint", "61b-hitl-wf-form-get-bogus-token", "62d-hitl-wf-events-missing-user",
        "62b-hitl-wf-events-task-id-instead-of-run-id", "63d-hitl-wf-submit-bogus-token",
    ],
)  # fmt: skip
async def test_json_answers_are_byte_identical(fake: FakeDify, session: aiohttp.ClientSession, case: str) -> None:
    if case.startswith("12-"):  # an upload without a file: multipart with the user only
        form = aiohttp.FormData()
        form.add_field("user", USER)
        async with session.post(fake.base_url + "/files/upload", data=form,
                                headers={"Authorization": f"Bearer {key('echo-chatflow')}"}) as response:  # fmt: skip
            status, headers, body = response.status, dict(response.headers), await response.read()
    else:
        if case.startswith("114"):
            fake.enable_suggested_questions(key("llm-chat"), ["What can you do?", "Tell me more", "Give an example"])
        status, headers, body = await replay(fake, session, case)
    assert (status, body) == recorded(case)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Version"] == "1.16.1"
    assert headers["Access-Control-Expose-Headers"] == "X-Env, X-Trace-Id, X-Version"
    assert headers["Vary"] == "Cookie"
    if status == 401:
        assert headers["WWW-Authenticate"] == 'Bearer realm="api"'


async def test_deleting_a_conversation_is_204_without_a_body(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    _, _, raw = await replay(fake, session, "20-chatflow-stream-new")
    conversation = chunks_of(raw)[0]["conversation_id"]
    status, headers, body = await replay(fake, session, "99-chatflow-delete-conversation",
                                         path=f"/conversations/{conversation}")  # fmt: skip
    assert (status, body) == recorded("99-chatflow-delete-conversation") == (204, b"")
    assert headers["Content-Type"] == "application/json"
    assert conversation not in fake.conversations


# --- streams ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "101-llm-chatflow-stream-new", "104-llm-chatflow-think-separated", "105-llm-chatflow-fail500",
        "111-llm-chat-stream-new", "115-llm-chat-think-tagged", "116-llm-chat-fail500",
        "122-llm-agent-stream-no-tool", "124-llm-agent-fail500", "131-llm-completion-stream",
        "133-llm-completion-fail500", "141-llm-workflow-stream", "143-llm-workflow-think-separated",
        "144-llm-workflow-fail500", "82-workflow-missing-required-input",
    ],
)  # fmt: skip
async def test_stream_has_the_recorded_events_and_key_order(
    fake: FakeDify, session: aiohttp.ClientSession, case: str
) -> None:
    if "think" in case:
        fake.configure(key(app_of(case)), think=True)
    changes = {}
    if "conversation_id" in json.loads(request_of(case)[3]):  # a continued conversation: start one first
        _, _, first = await replay(fake, session, case, conversation_id="")
        changes["conversation_id"] = chunks_of(first)[0]["conversation_id"]
    status, headers, raw = await replay(fake, session, case, **changes)
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    ours, theirs = chunks_of(raw), chunks_of(recorded(case)[1])
    assert sequence(ours) == sequence(theirs)
    assert raw.startswith(b"event: ping\n\n") == recorded(case)[1].startswith(b"event: ping\n\n")
    for event in sorted({c["event"] for c in theirs}):
        mine = [c for c in ours if c["event"] == event]
        real = [c for c in theirs if c["event"] == event]
        for m, r in zip(mine, real, strict=False):
            if event in ("node_started", "node_finished"):
                same_node = [c for c in mine if c["data"]["node_id"] == r["data"]["node_id"]]
                m = same_node[[c for c in real if c["data"]["node_id"] == r["data"]["node_id"]].index(r)]
            assert shape(m) == shape(r), event
    assert b'", "' not in raw and b'":"' in raw  # compact JSON, as 1.x's orjson writes it


async def test_a_stream_with_text_matches_the_recording_but_for_ids_and_numbers(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    _, _, raw = await replay(fake, session, "111-llm-chat-stream-new")
    texts = [c["answer"] for c in chunks_of(raw) if c["event"] == "message"]
    recorded_texts = [c["answer"] for c in chunks_of(recorded("111-llm-chat-stream-new")[1]) if c["event"] == "message"]
    assert texts == recorded_texts  # the same model words, token by token


async def test_non_ascii_streams_as_utf8(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    fake.configure(key("llm-chat"), answer="你好 世界")
    _, _, raw = await replay(fake, session, "111-llm-chat-stream-new")
    assert "你好".encode() in raw and b"\\u4f60" not in raw


@pytest.mark.parametrize(
    ("case", "stop_case"),
    [
        ("108-llm-chatflow-stream-stopped", "108-llm-chatflow-stream-stopped-stop"),
        ("145-llm-workflow-stream-stopped", "145-llm-workflow-stream-stopped-stop"),
        ("117-llm-chat-stream-stopped", "117-llm-chat-stream-stopped-stop"),
    ],
)
async def test_a_stopped_stream_ends_like_the_recording(
    fake: FakeDify, session: aiohttp.ClientSession, case: str, stop_case: str
) -> None:
    fake.configure(key(app_of(case)), slow_token_delay=0.05)
    _, path, headers, body = request_of(case)
    headers["Authorization"] = f"Bearer {key(app_of(case))}"
    stopped = False
    raw = b""
    async with session.post(fake.base_url + path, data=body, headers=headers) as response:
        async for chunk in response.content.iter_any():
            raw += chunk
            tokens = raw.count(b'"event":"message"') + raw.count(b'"event":"text_chunk"')
            if tokens >= 3 and not stopped:
                task_id = chunks_of(raw)[-1]["task_id"]
                _, stop_path, _, _ = request_of(stop_case)
                stop_path = stop_path.rsplit("/", 2)[0] + f"/{task_id}/stop"
                status, _, answer = await replay(fake, session, stop_case, path=stop_path)
                assert (status, answer) == recorded(stop_case)
                stopped = True
    ours, theirs = chunks_of(raw), chunks_of(recorded(case)[1])
    assert sequence(ours)[-1:] == sequence(theirs)[-1:]
    assert ours[-1]["event"] == theirs[-1]["event"]
    assert shape(ours[-1]) == shape(theirs[-1])
    if ours[-1]["event"] == "workflow_finished":
        assert (ours[-1]["data"]["status"], ours[-1]["data"]["error"], ours[-1]["data"]["outputs"]) == (
            "stopped", "Aborted: User requested stop", {}
        )
        assert "message_end" not in sequence(ours)


@pytest.mark.parametrize(
    "case", ["113-llm-chat-blocking", "106-llm-chatflow-blocking", "142-llm-workflow-blocking",
             "144b-llm-workflow-fail500-blocking", "132-llm-completion-blocking", "22-chatflow-blocking"]
)  # fmt: skip
async def test_blocking_answers_have_the_recorded_shape(
    fake: FakeDify, session: aiohttp.ClientSession, case: str
) -> None:
    changes: dict[str, Any] = {}
    if "conversation_id" in json.loads(request_of(case)[3]):
        _, _, first = await replay(fake, session, case, conversation_id="", response_mode="streaming")
        changes["conversation_id"] = chunks_of(first)[0]["conversation_id"]
    if "fail500" in case:
        changes["inputs"] = {"query": "fail500 please"}
    status, headers, body = await replay(fake, session, case, **changes)
    expected_status, expected = recorded(case)
    assert status == expected_status
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert shape(json.loads(body)) == shape(json.loads(expected))
    assert b'", "' in body and not body.endswith(b"\n")


@pytest.mark.parametrize(
    ("case", "app"),
    [("03-parameters-chatflow", "echo-chatflow"), ("04-parameters-workflow", "echo-workflow"),
     ("100b-llm-parameters-chatflow", "llm-chatflow"), ("110b-llm-parameters-chat", "llm-chat"),
     ("120b-llm-parameters-agent", "llm-agent"), ("130b-llm-parameters-completion", "llm-completion")],
)  # fmt: skip
async def test_parameters_have_the_recorded_keys(
    fake: FakeDify, session: aiohttp.ClientSession, case: str, app: str
) -> None:
    async with session.get(fake.base_url + "/parameters", headers={"Authorization": f"Bearer {key(app)}"}) as r:
        ours = await r.json()
    theirs = json.loads(recorded(case)[1])
    assert list(ours) == list(theirs)
    assert shape(ours["file_upload"]) == shape(theirs["file_upload"])


async def test_upload_answers_with_the_recorded_keys(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"0123456789", filename="test.png", content_type="image/png")
    form.add_field("user", USER)
    headers = {"Authorization": f"Bearer {key('echo-chatflow')}"}
    async with session.post(fake.base_url + "/files/upload", data=form, headers=headers) as response:
        status, raw = response.status, await response.read()
    assert status == 201
    assert list(json.loads(raw)) == list(json.loads(recorded("10-files-upload-png")[1]))
    assert b"\\/files\\/" in raw  # flask-restx escapes slashes


# --- human input ----------------------------------------------------------------------------------------------


async def pause(fake: FakeDify, session: aiohttp.ClientSession, case: str) -> tuple[list[dict[str, Any]], str, str]:
    """Start the recorded run that pauses at its form: its events, its run id, its form token."""
    status, _, raw = await replay(fake, session, case)
    assert status == 200
    chunks = chunks_of(raw)
    required = next(c for c in chunks if c["event"] == "human_input_required")
    return chunks, chunks[0]["workflow_run_id"], required["data"]["form_token"]


@pytest.mark.parametrize("case", ["60-hitl-wf-stream-pause", "70-hitl-cf-stream-pause"])
async def test_a_run_pauses_at_its_form_like_the_recording(
    fake: FakeDify, session: aiohttp.ClientSession, case: str
) -> None:
    ours, _, token = await pause(fake, session, case)
    theirs = chunks_of(recorded(case)[1])
    assert [c["event"] for c in ours] == [c["event"] for c in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert shape(mine) == shape(real), mine["event"]
    assert ours[-2]["data"]["form_content"] == theirs[-2]["data"]["form_content"]  # the query filled in
    assert re.fullmatch(r"[A-Za-z0-9]{22}", token)
    assert ours[-1]["data"]["reasons"][0]["form_token"] == token


async def test_the_form_route_answers_like_the_recording(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    _, _, token = await pause(fake, session, "60-hitl-wf-stream-pause")
    status, _, body = await replay(fake, session, "61-hitl-wf-form-get", path=f"/form/human_input/{token}")
    expected_status, expected = recorded("61-hitl-wf-form-get")
    assert status == expected_status
    assert json.loads(body) | {"expiration_time": 0} == json.loads(expected) | {"expiration_time": 0}
    assert b'", "' in body and not body.endswith(b"\n")  # a plain json.dumps Response


async def test_a_form_of_another_app_is_not_found(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    _, _, token = await pause(fake, session, "70-hitl-cf-stream-pause")  # the chatflow's form
    case = "61c-hitl-wf-form-get-other-app-key"
    status, _, body = await replay(fake, session, case, path=f"/form/human_input/{token}")
    assert (status, normalized(body)) == (404, normalized(recorded(case)[1]))


async def test_submitting_a_form_resumes_the_run_on_its_events_route(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    _, run_id, token = await pause(fake, session, "70-hitl-cf-stream-pause")
    status, _, body = await replay(fake, session, "71-hitl-cf-form-get", path=f"/form/human_input/{token}")
    assert status == 200
    expected = json.loads(recorded("71-hitl-cf-form-get")[1])
    assert json.loads(body) | {"expiration_time": 0} == expected | {"expiration_time": 0}
    _, events_path, headers, _ = request_of("72-hitl-cf-events-resumed")
    headers["Authorization"] = f"Bearer {key('hitl-chatflow')}"
    events_path = f"/workflow/{run_id}/events?user={USER}"
    async with session.get(fake.base_url + events_path, headers=headers) as events:
        assert events.headers["Cache-Control"] == "no-cache"
        first = await events.content.readuntil(b"\n\n")
        assert first == b"event: ping\n\n"  # subscribed: now the form may be answered
        for case in ("73-hitl-cf-submit-invalid-action", "74-hitl-cf-submit-approve", "75-hitl-cf-submit-double"):
            status, _, body = await replay(fake, session, case, path=f"/form/human_input/{token}")
            assert (status, normalized(body)) == (recorded(case)[0], normalized(recorded(case)[1])), case
        raw = await events.read()
    ours, theirs = chunks_of(raw), chunks_of(recorded("72-hitl-cf-events-resumed")[1])
    assert [c["event"] for c in ours] == [c["event"] for c in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert shape(mine) == shape(real), mine["event"]
    answer = "".join(c["answer"] for c in ours if c["event"] == "message")
    assert answer == "Decision: Approve (approve), comment: go ahead, query: may I deploy v2?"
    assert ours[0]["data"]["reason"] == "resumption" and ours[0]["task_id"] == chunks_of(raw)[-1]["task_id"]
    # afterwards the run is over: its events route gives its end alone (76)
    status, _, after = await replay(fake, session, "76-hitl-cf-events-after-finish", path=events_path)
    (finished,) = chunks_of(after)
    assert shape(finished) == shape(chunks_of(recorded("76-hitl-cf-events-after-finish")[1])[0])
    assert finished["data"]["outputs"]["answer"] == answer


async def test_a_resumed_workflow_ends_stopped_while_its_record_has_the_outputs(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    """The 1.16.1 defect of 62 / 66b, reproduced."""
    _, run_id, token = await pause(fake, session, "60-hitl-wf-stream-pause")
    headers = {"Authorization": f"Bearer {key('hitl-workflow')}"}
    async with session.get(f"{fake.base_url}/workflow/{run_id}/events?user={USER}", headers=headers) as events:
        await events.content.readuntil(b"\n\n")
        status, _, body = await replay(fake, session, "64-hitl-wf-submit-approve", path=f"/form/human_input/{token}")
        assert (status, body) == recorded("64-hitl-wf-submit-approve") == (200, b"{}\n")
        raw = await events.read()
    status, _, body = await replay(fake, session, "65-hitl-wf-submit-double", path=f"/form/human_input/{token}")
    assert (status, normalized(body)) == (412, normalized(recorded("65-hitl-wf-submit-double")[1]))
    ours, theirs = chunks_of(raw), chunks_of(recorded("62-hitl-wf-events-resumed")[1])
    assert [c["event"] for c in ours] == [c["event"] for c in theirs]
    assert (ours[-1]["data"]["status"], ours[-1]["data"]["outputs"], ours[-1]["data"]["error"]) == (
        "stopped", {}, "Stopped by user."
    )
    async with session.get(f"{fake.base_url}/workflows/run/{run_id}", headers=headers) as response:
        detail = await response.json()
    expected = json.loads(recorded("66b-hitl-wf-run-detail-after-finish")[1])
    assert shape(detail) == shape(expected)
    assert (detail["status"], detail["error"]) == ("stopped", "Aborted: App task was stopped")
    assert detail["outputs"] == expected["outputs"] | {"query": "deploy v2 to prod"}
    case = "65b-hitl-wf-form-get-after-submit"
    status, _, body = await replay(fake, session, case, path=f"/form/human_input/{token}")
    assert (status, normalized(body)) == (412, normalized(recorded(case)[1]))


async def test_without_the_defect_a_resumed_workflow_streams_its_end(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    fake.configure(key("hitl-workflow"), resume_bug=False)  # the capture's control run (66c–66e)
    _, run_id, token = await pause(fake, session, "60-hitl-wf-stream-pause")
    headers = {"Authorization": f"Bearer {key('hitl-workflow')}"}
    async with session.get(f"{fake.base_url}/workflow/{run_id}/events?user={USER}", headers=headers) as events:
        await events.content.readuntil(b"\n\n")
        await replay(fake, session, "66e-hitl-wf-control-submit-approve", path=f"/form/human_input/{token}")
        raw = await events.read()
    ours, theirs = chunks_of(raw), chunks_of(recorded("66d-hitl-wf-control-events-resumed")[1])
    assert sequence(ours) == sequence(theirs)
    assert "".join(c["data"]["text"] for c in ours if c["event"] == "text_chunk") == (
        "approve\nApprove\nLGTM (control)\ndeploy v2 to prod"
    )


@pytest.mark.parametrize(
    ("pause_case", "snapshot_case"),
    [("60-hitl-wf-stream-pause", "60c-hitl-wf-events-while-paused-snapshot"),
     ("70-hitl-cf-stream-pause", "70b-hitl-cf-events-while-paused-snapshot")],
)  # fmt: skip
async def test_the_state_snapshot_of_a_paused_run_is_like_the_recording(
    fake: FakeDify, session: aiohttp.ClientSession, pause_case: str, snapshot_case: str
) -> None:
    _, run_id, _ = await pause(fake, session, pause_case)
    path = f"/workflow/{run_id}/events?user={USER}&include_state_snapshot=true"
    status, _, raw = await replay(fake, session, snapshot_case, path=path)
    ours, theirs = chunks_of(raw), chunks_of(recorded(snapshot_case)[1])
    assert status == 200 and raw.startswith(b"event: ping\n\n")
    assert [c["event"] for c in ours] == [c["event"] for c in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert shape(mine) == shape(real), mine["event"]


async def test_events_of_another_user_are_not_found(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    _, run_id, _ = await pause(fake, session, "60-hitl-wf-stream-pause")
    path = f"/workflow/{run_id}/events?user=bob"
    status, _, body = await replay(fake, session, "62c-hitl-wf-events-other-user", path=path)
    assert (status, body) == recorded("62c-hitl-wf-events-other-user")


@pytest.mark.parametrize(
    ("case", "pause_case"), [("63-hitl-wf-submit-invalid-action", "60-hitl-wf-stream-pause"),
                             ("63b-hitl-wf-submit-missing-input", "60-hitl-wf-stream-pause"),
                             ("63c-hitl-wf-submit-missing-user", "60-hitl-wf-stream-pause"),
                             ("69b-hitl-wf-timeout-form-get", "69-hitl-wf-timeout-stream-pause"),
                             ("69c-hitl-wf-timeout-submit", "69-hitl-wf-timeout-stream-pause"),
                             ("79b-hitl-cf-timeout-form-get", "79-hitl-cf-timeout-stream-pause"),
                             ("79c-hitl-cf-timeout-submit", "79-hitl-cf-timeout-stream-pause")],
)  # fmt: skip
async def test_refused_form_answers_are_like_the_recording(
    fake: FakeDify, session: aiohttp.ClientSession, case: str, pause_case: str
) -> None:
    _, _, token = await pause(fake, session, pause_case)
    status, _, body = await replay(fake, session, case, path=f"/form/human_input/{token}")
    assert (status, normalized(body)) == (recorded(case)[0], normalized(recorded(case)[1]))
    assert fake.form_submissions == []


async def test_continue_on_pause_keeps_the_events_route_open_after_the_end(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    _, run_id, token = await pause(fake, session, "67-hitl-wf-stream-pause-2")
    path = f"{fake.base_url}/workflow/{run_id}/events?user={USER}&continue_on_pause=true"
    async with session.get(path, headers={"Authorization": f"Bearer {key('hitl-workflow')}"}) as events:
        await events.content.readuntil(b"\n\n")
        await replay(fake, session, "67c-hitl-wf-submit-reject-by-bob", path=f"/form/human_input/{token}")
        raw = b""
        while b"workflow_finished" not in raw:
            raw += await events.content.readuntil(b"\n\n")
        after = await events.content.readuntil(b"\n\n")  # not EOF: a ping, as in 67b
    assert after == b"event: ping\n\n"
    assert fake.form_submissions[-1]["user"] == "bob"  # any end user may answer (67c)


async def test_a_blocking_run_pauses_with_its_form(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    for case in ("68-hitl-wf-blocking", "78-hitl-cf-blocking"):
        status, _, body = await replay(fake, session, case)
        assert status == 200
        assert shape(json.loads(body)) == shape(json.loads(recorded(case)[1]))
        token = json.loads(body)["data"]["reasons"][0]["form_token"]
        assert token
    # the run record while paused (60b), and a number for a paragraph field taken as it is (68c)
    run_id = json.loads(body)["workflow_run_id"]
    (workflow_run,) = [r for r in fake.workflow_runs.values() if r.mode == "workflow"]
    async with session.get(f"{fake.base_url}/workflows/run/{workflow_run.id}",
                           headers={"Authorization": f"Bearer {key('hitl-workflow')}"}) as response:  # fmt: skip
        detail = await response.json()
    assert shape(detail) == shape(json.loads(recorded("60b-hitl-wf-run-detail-while-paused")[1]))
    assert (detail["status"], detail["outputs"], detail["finished_at"]) == ("paused", {}, None)
    workflow_token = workflow_run.forms[0].token
    status, _, body = await replay(fake, session, "68c-hitl-wf-blocking-submit-number-for-paragraph",
                                   path=f"/form/human_input/{workflow_token}")  # fmt: skip
    assert (status, body) == recorded("68c-hitl-wf-blocking-submit-number-for-paragraph") == (200, b"{}\n")
    assert fake.form_submissions[-1]["inputs"] == {"comment": 42}
    assert run_id


async def test_events_of_a_run_that_lost_its_client_go_on_for_a_subscriber(
    fake: FakeDify, session: aiohttp.ClientSession
) -> None:
    """1.x keeps a cut run going: whoever listens on its events route sees the rest (what dingdifyd follows)."""
    fake.configure(key("llm-chatflow"), cut_after=3, token_delay=0.01)
    _, path, headers, body = request_of("101-llm-chatflow-stream-new")
    headers["Authorization"] = f"Bearer {key('llm-chatflow')}"
    async with session.post(fake.base_url + path, data=body, headers=headers) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (run_id,) = [r.id for r in fake.workflow_runs.values()]
    async with session.get(f"{fake.base_url}/workflow/{run_id}/events?user={USER}&include_state_snapshot=true",
                           headers=headers) as events:  # fmt: skip
        raw = await events.read()
    chunks = chunks_of(raw)
    assert chunks[0]["event"] == "workflow_started" and chunks[1] == chunks[1] | {"event": "message_replace"}
    assert sequence(chunks)[-2:] == ["message_end", "workflow_finished"]
    assert chunks[-1]["data"]["outputs"]["answer"].startswith("Echo: Hello LLM chatflow, first turn |")


async def test_the_events_route_can_be_made_to_refuse(fake: FakeDify, session: aiohttp.ClientSession) -> None:
    _, run_id, _ = await pause(fake, session, "60-hitl-wf-stream-pause")
    fake.configure(key("hitl-workflow"), events_route_status=404)
    headers = {"Authorization": f"Bearer {key('hitl-workflow')}"}
    async with session.get(f"{fake.base_url}/workflow/{run_id}/events?user={USER}", headers=headers) as r:
        assert r.status == 404
    await asyncio.sleep(0)
