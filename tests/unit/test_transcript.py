"""How a run's events become the card's text and its ending, and what a failure note may say. Pure."""

from __future__ import annotations

import pytest

from dingdifyd.bridge.failures import failure_note, safe_reason
from dingdifyd.bridge.progress import progress_line
from dingdifyd.bridge.transcript import Ending, Transcript
from dingdifyd.dify.events import ReasoningDelta, StepEvent, TextDelta, TextReplace, WorkflowFinished
from dingdifyd.errors import DifyError, DifyRateLimited, DifyStreamCut


def fed(*events) -> Transcript:
    transcript = Transcript()
    for event in events:
        transcript.feed(event)
    return transcript


def delta(text: str) -> TextDelta:
    return TextDelta(event="message", text=text)


def test_reasoning_still_open_shows_as_an_unclosed_think_block() -> None:
    transcript = fed(ReasoningDelta(event="reasoning_chunk", text="Let me see"))
    assert transcript.raw == "<think>Let me see"


def test_the_first_answer_words_close_the_reasoning() -> None:
    transcript = fed(ReasoningDelta(event="reasoning_chunk", text="Hmm."), delta("Yes."),
                     ReasoningDelta(event="reasoning_chunk", text=" late"))  # fmt: skip
    assert transcript.raw == "<think>Hmm.</think>\n\nYes."


def test_a_final_reasoning_chunk_closes_it_before_any_answer() -> None:
    transcript = fed(ReasoningDelta(event="reasoning_chunk", text="Done thinking"),
                     ReasoningDelta(event="reasoning_chunk", is_final=True))  # fmt: skip
    assert transcript.raw == "<think>Done thinking</think>\n\n"


def test_moderation_replaces_and_locks_the_answer() -> None:
    transcript = fed(delta("bad "), TextReplace(event="message_replace", text="Sorry."), delta("worse"))
    assert transcript.raw == "Sorry."


def test_a_restored_answer_does_not_lock_it() -> None:
    transcript = fed(TextReplace(event="text_replace", text="So far", moderated=False), delta(" and on"))
    assert transcript.raw == "So far and on"


def test_a_workflow_without_streamed_text_answers_with_its_outputs() -> None:
    transcript = fed(WorkflowFinished(event="workflow_finished", status="succeeded", outputs={"answer": "42"}))
    assert (transcript.raw, transcript.ending) == ("42", Ending.ANSWERED)


@pytest.mark.parametrize(
    ("events", "ending"),
    [
        ([delta("half"), WorkflowFinished(event="workflow_finished", status="stopped",
                                          error="Aborted: User requested stop")], Ending.STOPPED),
        ([WorkflowFinished(event="workflow_finished", status="stopped", outputs={},
                           error="Stopped by user.")], Ending.STOPPED),
        # 1.16.1's resumed workflow: stopped, yet its record had the outputs (read by dify/guarded.py)
        ([WorkflowFinished(event="workflow_finished", status="stopped", outputs={"answer": "done"},
                           error="Aborted: App task was stopped")], Ending.ANSWERED),
        ([WorkflowFinished(event="workflow_finished", status="stopped",
                           error="Aborted: Client response stream closed before app execution completed")],
         Ending.CUT),
        ([delta("all"), WorkflowFinished(event="workflow_finished", status="succeeded")], Ending.ANSWERED),
    ],
)  # fmt: skip
def test_how_a_run_ended(events, ending: Ending) -> None:
    assert fed(*events).ending is ending


@pytest.mark.parametrize(
    "message",
    ["query is required in input form", "department in input form must be a string", "Invalid upload file",
     "Missing required inputs: comment", "sys.files in input form must be less than 10 characters"],
)  # fmt: skip
def test_reasons_a_person_may_read(message: str) -> None:
    assert safe_reason(message) == message
    assert failure_note(DifyError(message)) == f"The AI app could not answer: {message}"


@pytest.mark.parametrize(
    "message",
    ["[Errno 111] Connection refused", "fake upstream failure (fail500)",
     "1 validation error for ChatRequestPayload\nquery\n  Field required", "x" * 300 + " is required in input form",
     "Run failed: [openai] Error: API key sk-123 is invalid"],
)  # fmt: skip
def test_reasons_that_stay_in_the_log(message: str) -> None:
    assert safe_reason(message) is None
    assert failure_note(DifyError(message)) == DifyError.user_message


def test_other_failures_keep_their_own_note() -> None:
    assert failure_note(DifyRateLimited("busy")) == DifyRateLimited.user_message
    assert failure_note(DifyStreamCut("query is required in input form")) == "The AI app could not answer: " + (
        "query is required in input form"
    )


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (StepEvent(event="node_retry", kind="node_retry", title="Search", index=1), "🔁 Retrying Search (attempt 2)…"),
        (StepEvent(event="iteration_next", kind="iteration_next", title="Each page", index=2),
         "⏳ Each page (round 3)…"),
        (StepEvent(event="loop_started", kind="loop_started", title="Refine"), "⏳ Refine…"),
        (StepEvent(event="agent_log", kind="agent_log", title="ROUND 2", status="start"), "🔧 ROUND 2…"),
        (StepEvent(event="agent_log", kind="agent_log", title="ROUND 2", status="success"), None),
        (StepEvent(event="iteration_completed", kind="iteration_completed", title="Each page"), None),
        (StepEvent(event="node_retry", kind="node_retry", title=" "), None),
    ],
)  # fmt: skip
def test_step_lines(event: StepEvent, line: str | None) -> None:
    assert progress_line(event) == line
