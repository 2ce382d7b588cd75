"""Every recorded Dify 1.16.1 stream decodes into typed events without a loss: its text is the answer, its
reasoning, files, steps, pauses and forms are what the bytes say (tests/fixtures/dify-1.16.1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dingdifyd.bridge.transcript import Ending, Transcript
from dingdifyd.dify.client import ends_answer_stream, ends_run_stream, parse_version
from dingdifyd.dify.events import (
    DifyEvent,
    HumanInputRequired,
    MessageEnd,
    OtherEvent,
    ReasoningDelta,
    StepEvent,
    TextDelta,
    WorkflowFinished,
    WorkflowPaused,
    parse_event,
)
from dingdifyd.dify.forms import HumanInputForm, parse_form
from tests.support.transcripts import DIFY_1_16_FIXTURES, chunks_of

FIXTURES = DIFY_1_16_FIXTURES
ANSWER_TAIL = "This is a fake streamed answer from the local fake model."
STREAMS = sorted(path.stem for path in FIXTURES.glob("*.sse"))


def events_of(case: str) -> list[DifyEvent]:
    return [parse_event(chunk) for chunk in chunks_of((FIXTURES / f"{case}.sse").read_bytes())]


def transcript_of(case: str) -> Transcript:
    transcript = Transcript()
    for event in events_of(case):
        transcript.feed(event)
    return transcript


def json_of(case: str) -> Any:
    return json.loads((FIXTURES / f"{case}.json").read_text())


@pytest.mark.parametrize("case", STREAMS)
def test_every_recorded_stream_parses_and_only_unknown_names_are_other_events(case: str) -> None:
    known = {"workflow_started", "node_finished", "error"}  # (the client raises `error` events)
    for event in events_of(case):
        if isinstance(event, OtherEvent):
            assert event.event in known | {"ping"}, event.event


@pytest.mark.parametrize(
    ("case", "answer"),
    [
        ("101-llm-chatflow-stream-new", f"Echo: Hello LLM chatflow, first turn | {ANSWER_TAIL}"),
        ("111-llm-chat-stream-new", f"Echo: Hello LLM chatbot | {ANSWER_TAIL}"),
        ("141-llm-workflow-stream", f"Echo: Hello LLM workflow | {ANSWER_TAIL}"),
        ("72-hitl-cf-events-resumed", "Decision: Approve (approve), comment: go ahead, query: may I deploy v2?"),
        ("20-chatflow-stream-new", "Echo: Hello chatflow, first turn"),
    ],
)
def test_the_text_of_a_stream_is_its_answer(case: str, answer: str) -> None:
    transcript = transcript_of(case)
    assert transcript.answer.startswith(answer)
    assert transcript.ending is Ending.ANSWERED


def test_separated_reasoning_becomes_a_think_block_before_the_answer() -> None:
    events = events_of("104-llm-chatflow-think-separated")
    reasoning = [e for e in events if isinstance(e, ReasoningDelta)]
    assert reasoning[-1].is_final and reasoning[-1].text == ""
    transcript = transcript_of("104-llm-chatflow-think-separated")
    assert transcript.raw == (
        "<think>\nThe user wants an echo; these are reasoning words.\n</think>\n\n"
        f"Echo: please think before answering | {ANSWER_TAIL}"
    )
    # the same as a model that writes <think> into its answer (115): show_reasoning treats both alike
    tagged = transcript_of("115-llm-chat-think-tagged").raw
    assert tagged.replace("\n", "") == transcript.raw.replace("\n", "")


def test_a_workflow_streams_reasoning_too() -> None:
    assert transcript_of("143-llm-workflow-think-separated").raw.startswith("<think>\nThe user wants")


def test_files_of_the_answer_are_read_from_message_end_and_workflow_finished() -> None:
    events = events_of("26b-chatflow-answer-echoes-file")
    (end,) = [e for e in events if isinstance(e, MessageEnd)]
    (finished,) = [e for e in events if isinstance(e, WorkflowFinished)]
    assert [f["filename"] for f in end.files] == ["test.png"]
    assert [f["filename"] for f in finished.files] == ["test.png"]
    assert "![test.png](" in transcript_of("26b-chatflow-answer-echoes-file").answer


@pytest.mark.parametrize(
    "case", ["36-chatflow-stream-stopped", "87-workflow-stream-stopped", "108-llm-chatflow-stream-stopped"]
)
def test_a_run_stopped_in_dify_ends_stopped(case: str) -> None:
    events = events_of(case)
    assert isinstance(events[-1], WorkflowFinished) and events[-1].status == "stopped"
    assert ends_answer_stream(events[-1], "chatflow") and ends_answer_stream(events[-1], "workflow")
    assert transcript_of(case).ending is Ending.STOPPED


def test_a_successful_chatflow_ends_at_message_end_not_at_workflow_finished() -> None:
    events = events_of("101-llm-chatflow-stream-new")
    ends = [e.event for e in events if ends_answer_stream(e, "chatflow")]
    assert ends == ["message_end"]  # 1.x sends it first; 0.15.3 after workflow_finished (both end there)
    assert [e.event for e in events if ends_run_stream(e)] == ["workflow_finished"]


@pytest.mark.parametrize("case", ["60-hitl-wf-stream-pause", "70-hitl-cf-stream-pause"])
def test_a_pause_carries_its_form(case: str) -> None:
    events = events_of(case)
    required = next(e for e in events if isinstance(e, HumanInputRequired))
    paused = events[-1]
    assert isinstance(paused, WorkflowPaused) and ends_answer_stream(paused, "workflow")
    form = required.form
    assert form is not None and paused.forms == (form,)  # the pause's reason is the same form
    assert form.token == "REDACTED"
    assert form.node_title == "Review"
    assert [(a.id, a.title, a.style) for a in form.actions] == [("approve", "Approve", "primary"),
                                                                ("reject", "Reject", "default")]  # fmt: skip
    assert [(f.name, f.type, f.default) for f in form.fields] == [("comment", "paragraph", "")]
    assert form.content.startswith("Please review: ") and "{{#$output.comment#}}" in form.content
    assert form.expires_at and form.expires_at > 1796390000
    transcript = transcript_of(case)
    assert transcript.ending is Ending.PAUSED and transcript.forms[0].form_id == form.form_id


def test_the_form_route_and_the_event_describe_the_same_form() -> None:
    from_route = parse_form(json_of("61-hitl-wf-form-get"))
    from_event = next(e for e in events_of("60-hitl-wf-stream-pause") if isinstance(e, HumanInputRequired)).form
    assert from_route is not None and from_event is not None
    assert (from_route.fields, from_route.actions, from_route.content, from_route.expires_at) == (
        from_event.fields, from_event.actions, from_event.content, from_event.expires_at
    )


def test_a_form_survives_the_store() -> None:
    form = next(e for e in events_of("70-hitl-cf-stream-pause") if isinstance(e, HumanInputRequired)).form
    assert form is not None
    assert HumanInputForm.from_dict(json.loads(json.dumps(form.to_dict()))) == form


def test_select_and_file_fields_parse() -> None:
    form = parse_form({
        "form_content": "Pick", "actions": [{"id": "go", "title": "Go"}],
        "inputs": [
            {"output_variable_name": "size", "type": "select",
             "option_source": {"type": "constant", "selector": [], "value": ["S", "M", "L"]}},
            {"output_variable_name": "doc", "type": "file", "allowed_file_types": ["document"],
             "allowed_file_extensions": [".PDF"], "allowed_file_upload_methods": ["local_file"]},
            {"output_variable_name": "pics", "type": "file-list", "allowed_file_types": ["image"], "number_limits": 2},
            {"type": "paragraph"},  # no variable: nothing could be submitted for it
        ],
        "form_token": None,
    })  # fmt: skip
    assert form is not None and form.token is None
    size, doc, pics = form.fields
    assert size.options == ("S", "M", "L")
    assert (doc.is_file, doc.file_types, doc.file_extensions) == (True, ("document",), ("pdf",))
    assert (pics.type, pics.max_files) == ("file-list", 2)


@pytest.mark.parametrize("bad", [None, [], {}, {"actions": []}, {"actions": [{"title": "no id"}]}, "x"])
def test_malformed_forms_are_not_forms(bad: Any) -> None:
    assert parse_form(bad) is None


def test_step_events_parse() -> None:
    retry = parse_event({"event": "node_retry", "task_id": "t", "data": {"title": "Search", "retry_index": 2}})
    log = parse_event({"event": "agent_log", "task_id": "t", "data": {"label": "ROUND 1", "status": "start"}})
    assert retry == StepEvent(event="node_retry", task_id="t", kind="node_retry", title="Search", index=2)
    assert isinstance(log, StepEvent) and (log.title, log.status) == ("ROUND 1", "start")


def test_text_replace_of_a_workflow_is_moderation() -> None:
    event = parse_event({"event": "text_replace", "task_id": "t", "data": {"text": "No."}})
    transcript = Transcript()
    transcript.feed(TextDelta(event="text_chunk", text="Forbidden "))
    transcript.feed(event)
    transcript.feed(TextDelta(event="text_chunk", text="more forbidden"))  # never after the replacement
    assert transcript.answer == "No."


@pytest.mark.parametrize(
    ("header", "version"), [("1.16.1", (1, 16, 1)), ("0.15.3", (0, 15, 3)), ("1.14.0-rc1", (1, 14, 0)), ("", None)]
)
def test_versions_parse(header: str, version: tuple[int, ...] | None) -> None:
    assert parse_version(header) == version
