"""Every recorded Dify 0.15.3 stream decodes into the expected typed events; its text is the whole answer."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from dingdifyd.dify.events import (
    AgentThought,
    DifyEvent,
    MessageEnd,
    MessageFile,
    NodeStarted,
    OtherEvent,
    TextDelta,
    TextReplace,
    WorkflowFinished,
    parse_event,
    text_from_outputs,
)
from dingdifyd.dify.sse import SSEBlockSplitter, parse_block
from tests.support.transcripts import DIFY_0_15_FIXTURES

FIXTURES = DIFY_0_15_FIXTURES
ANSWER_TAIL = "This is a fake streamed answer from the local fake OpenAI server."
SLOW_ANSWER = "Slow answer: " + " ".join(f"word{i}" for i in range(40))

TYPE_OF = {
    "message": TextDelta,
    "agent_message": TextDelta,
    "text_chunk": TextDelta,
    "message_replace": TextReplace,
    "agent_thought": AgentThought,
    "node_started": NodeStarted,
    "message_file": MessageFile,
    "message_end": MessageEnd,
    "workflow_finished": WorkflowFinished,
}


def status_of(case: str) -> int:
    return int((FIXTURES / f"{case}.headers").read_text().split()[1])


def request_body(case: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{case}.request.txt").read_text().split("\n\n", 1)[1])


def user_text(case: str) -> str:
    body = request_body(case)
    return body.get("query") or body["inputs"]["query"]


def model_answer(text: str) -> str:
    """What the capture's fake LLM answers (README of the transcripts)."""
    return SLOW_ANSWER if "slow" in text.lower() else f"Echo: {text} | {ANSWER_TAIL}"


STREAM_CASES = sorted(p.stem for p in FIXTURES.glob("*.sse") if status_of(p.stem) == 200)


def decode(case: str) -> tuple[list[dict[str, Any]], int]:
    """The JSON chunks of a recorded stream, and how many pings it had."""
    splitter = SSEBlockSplitter()
    blocks = splitter.feed((FIXTURES / f"{case}.sse").read_bytes()) + splitter.flush()
    pings = sum(1 for block in blocks if block.startswith(b"event: ping"))
    chunks = [json.loads(message.data) for block in blocks for message in parse_block(block)]
    return chunks, pings


def summary_of(chunks: list[dict[str, Any]], pings: int) -> str:
    """The run-length form the transcripts' README uses: `message×19 message_end×1 (+ event: ping ×2)`."""
    runs: list[list[Any]] = []
    for chunk in chunks:
        if runs and runs[-1][0] == chunk["event"]:
            runs[-1][1] += 1
        else:
            runs.append([chunk["event"], 1])
    text = " ".join(f"{name}×{count}" for name, count in runs)
    return text + (f" (+ event: ping ×{pings})" if pings else "")


def readme_summaries() -> dict[str, str]:
    rows = re.findall(r"^\| (\d\d-[\w-]+) \| 200 OK \| (.+?) \|$", (FIXTURES / "README.md").read_text(), re.M)
    return {case: summary.strip() for case, summary in rows}


def test_all_recorded_streams_are_covered() -> None:
    assert len(STREAM_CASES) >= 20


@pytest.mark.parametrize("case", STREAM_CASES)
def test_event_sequence_matches_the_recording_summary(case: str) -> None:
    chunks, pings = decode(case)
    assert summary_of(chunks, pings) == readme_summaries()[case]


@pytest.mark.parametrize("case", STREAM_CASES)
def test_every_chunk_decodes_to_its_typed_event(case: str) -> None:
    chunks, _ = decode(case)
    for chunk in chunks:
        event = parse_event(chunk)
        assert event.event == chunk["event"]
        assert isinstance(event, TYPE_OF.get(chunk["event"], OtherEvent))
        assert event.task_id == chunk.get("task_id", "")
        if "conversation_id" in chunk:
            assert event.conversation_id == chunk["conversation_id"]
        if "workflow_run_id" in chunk:
            assert event.workflow_run_id == chunk["workflow_run_id"]


def typed(case: str) -> list[DifyEvent]:
    chunks, _ = decode(case)
    return [parse_event(chunk) for chunk in chunks]


def streamed_text(events: list[DifyEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


COMPLETE_CASES = [
    case
    for case in STREAM_CASES
    if "stopped" not in case and "500" not in case and isinstance(typed(case)[-1], MessageEnd | WorkflowFinished)
]


@pytest.mark.parametrize("case", COMPLETE_CASES)
def test_streamed_text_is_the_whole_answer(case: str) -> None:
    events = typed(case)
    observations = [e for e in events if isinstance(e, AgentThought) and e.observation]
    if observations:  # the fake model reports what the tool said instead of echoing
        tool = observations[-1]
        expected = "Tool said: " + json.loads(tool.observation)[tool.tool]
    else:
        expected = model_answer(user_text(case))
    assert streamed_text(events) == expected


@pytest.mark.parametrize("case", COMPLETE_CASES)
def test_streamed_text_agrees_with_the_final_record_of_the_answer(case: str) -> None:
    events = typed(case)
    text = streamed_text(events)
    finished = [e for e in events if isinstance(e, WorkflowFinished)]
    thoughts = [e for e in events if isinstance(e, AgentThought) and e.thought]
    if finished:  # workflow and chatflow: the End / Answer node output
        assert finished[-1].status == "succeeded"
        assert text_from_outputs(finished[-1].outputs) == text
    elif thoughts:  # agent: the last thought holds the answer of its round
        assert text.endswith(thoughts[-1].thought)
    else:
        assert isinstance(events[-1], MessageEnd)
        assert events[-1].metadata["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    "case", ["22-chat-blocking", "35-chat-no-response-mode", "71-completion-blocking", "92-chatflow-blocking"]
)
def test_blocking_answers_are_the_same_model_answer(case: str) -> None:
    body = json.loads((FIXTURES / f"{case}.json").read_text())
    assert body["answer"] == model_answer(user_text(case))


def test_blocking_workflow_answer_is_in_outputs() -> None:
    body = json.loads((FIXTURES / "81-workflow-blocking.json").read_text())
    assert text_from_outputs(body["data"]["outputs"]) == model_answer(user_text("81-workflow-blocking"))


@pytest.mark.parametrize("case", ["36-chat-stream-stopped", "75-completion-stream-stopped"])
def test_stopped_streams_end_with_message_end_and_a_partial_answer(case: str) -> None:
    events = typed(case)
    assert isinstance(events[-1], MessageEnd)
    text = streamed_text(events)
    assert text and SLOW_ANSWER.startswith(text) and text != SLOW_ANSWER


def test_stopped_workflow_and_chatflow_report_stopped() -> None:
    workflow = typed("87-workflow-stream-stopped")
    assert isinstance(workflow[-1], WorkflowFinished) and workflow[-1].status == "stopped"
    chatflow = typed("96-chatflow-stream-stopped")
    assert [e.event for e in chatflow[-2:]] == ["workflow_finished", "message_end"]
    assert isinstance(chatflow[-2], WorkflowFinished) and chatflow[-2].status == "stopped"


def test_failed_workflow_carries_the_error() -> None:
    events = typed("86-workflow-llm-500")
    last = events[-1]
    assert isinstance(last, WorkflowFinished)
    assert last.status == "failed" and "fake upstream failure" in last.error
    assert last.outputs == {}


def test_in_stream_error_chunk_is_not_a_typed_answer_event() -> None:
    chunks, _ = decode("32-chat-upstream-llm-500")
    assert [c["event"] for c in chunks] == ["error"]
    assert chunks[0]["code"] == "completion_request_error" and chunks[0]["status"] == 400
    assert isinstance(parse_event(chunks[0]), OtherEvent)


def test_agent_thoughts_carry_tool_and_observation() -> None:
    thoughts = [e for e in typed("60-agent-stream-new") if isinstance(e, AgentThought)]
    assert [t.position for t in thoughts] == [1, 1, 1, 2, 2]
    assert thoughts[1].tool == "current_time" and not thoughts[1].observation
    assert "current_time" in thoughts[2].observation
    # a thought's own id is not the message id
    assert all(t.message_id == "79596aab-8f81-4107-9f69-2dc2b855f30c" for t in thoughts)


def test_node_started_names_the_node() -> None:
    nodes = [e for e in typed("90-chatflow-stream-new") if isinstance(e, NodeStarted)]
    assert [(n.node_type, n.title) for n in nodes] == [
        ("start", "Start"),
        ("llm", "LLM"),
        ("answer", "Answer"),
    ]


def test_message_end_carries_ids_and_usage() -> None:
    end = typed("20-chat-stream-new")[-1]
    assert isinstance(end, MessageEnd)
    assert end.conversation_id == "eb9e0df9-9576-4748-9d17-17f4afe6315b"
    assert end.message_id == "c0c294cf-be05-42bf-826e-8b56f8b31def"
    assert end.metadata["usage"]["total_tokens"] == 28


def test_shapes_not_in_the_recordings() -> None:
    replace = parse_event({"event": "message_replace", "task_id": "t", "answer": "[moderated]"})
    assert replace == TextReplace(event="message_replace", task_id="t", text="[moderated]")
    text_replace = parse_event({"event": "text_replace", "data": {"text": "x"}})
    assert isinstance(text_replace, TextReplace) and text_replace.text == "x"
    file_event = parse_event(
        {
            "event": "message_file",
            "id": "f",
            "type": "image",
            "belongs_to": "assistant",
            "url": "/files/tools/a.png",
        }
    )
    assert isinstance(file_event, MessageFile) and file_event.url == "/files/tools/a.png"
    odd = parse_event({"event": "node_started", "data": "not a dict"})
    assert isinstance(odd, NodeStarted) and odd.title == ""
    assert isinstance(parse_event({"event": "tts_message", "audio": ""}), OtherEvent)
    assert isinstance(parse_event({}), OtherEvent)


@pytest.mark.parametrize(
    ("outputs", "text"),
    [
        ({"answer": "A", "echo_query": "q"}, "A"),
        ({"echo_query": "q", "text": "T"}, "T"),
        ({"output": "O", "result": "R"}, "O"),
        ({"only": "S"}, "S"),
        ({"a": "x", "b": 3, "c": "y"}, "x\n\ny"),
        ({"answer": "", "other": "z"}, "z"),
        ({"n": 1, "files": []}, ""),
        ({}, ""),
    ],
)
def test_text_from_outputs(outputs: dict[str, Any], text: str) -> None:
    assert text_from_outputs(outputs) == text
