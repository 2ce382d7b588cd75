"""Typed Dify stream events, and the pure function that turns one decoded SSE `data:` JSON object into one.

Only what the bridge acts on gets its own type; every other event (node_finished, tts_*, workflow_started,
events of versions to come, ...) becomes `OtherEvent` and is harmless. `error` events are not returned: the
client raises them as DifyError. Dify 1.x added `reasoning_chunk`, `text_replace`, `node_retry`, `iteration_*`,
`loop_*`, `agent_log`, `human_input_required` and `workflow_paused` (task_entities.py's StreamEvent).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from dingdifyd.dify.forms import HumanInputForm, forms_of_pause, parse_form

# Events that show what a workflow is doing (progress lines); everything else of the kind is ignored.
STEP_EVENTS = (
    "node_retry", "iteration_started", "iteration_next", "loop_started", "loop_next", "agent_log",
)  # fmt: skip


@dataclass(frozen=True)
class DifyEvent:
    """Fields every chunk may carry. Empty string when the chunk does not have it."""

    event: str
    conversation_id: str = ""
    message_id: str = ""
    task_id: str = ""
    workflow_run_id: str = ""


@dataclass(frozen=True)
class TextDelta(DifyEvent):
    """`message`, `agent_message` (chat apps) or `text_chunk` (workflow): append `text` to the answer."""

    text: str = ""


@dataclass(frozen=True)
class TextReplace(DifyEvent):
    """`message_replace` / `text_replace` (output moderation): the whole answer becomes `text`.

    `moderated`: Dify replaced the answer and streams no more of the original, so later text of this run is
    not the answer's (it is dropped). False when dingdifyd itself restores the answer so far (a followed run)."""

    text: str = ""
    moderated: bool = True


@dataclass(frozen=True)
class ReasoningDelta(DifyEvent):
    """`reasoning_chunk` (1.x LLM nodes with `reasoning_format: separated`): the model's thinking, apart from the
    answer; `is_final` closes it."""

    text: str = ""
    is_final: bool = False


@dataclass(frozen=True)
class AgentThought(DifyEvent):
    position: int = 0
    thought: str = ""
    tool: str = ""
    observation: str = ""


@dataclass(frozen=True)
class NodeStarted(DifyEvent):
    title: str = ""
    node_type: str = ""


@dataclass(frozen=True)
class StepEvent(DifyEvent):
    """A step inside a running node: a retry (`node_retry`), an iteration or loop round, an agent's log line."""

    kind: str = ""  # the event name
    title: str = ""  # the node's title, or the agent log's label
    index: int = 0  # retry number, iteration or loop round (from 0 as Dify counts)
    status: str = ""  # agent_log: start | success | error


@dataclass(frozen=True)
class MessageFile(DifyEvent):
    url: str = ""  # often relative and signed: /files/tools/<uuid>.png?timestamp=...
    file_type: str = ""
    belongs_to: str = ""


@dataclass(frozen=True)
class MessageEnd(DifyEvent):
    """Terminal for chatbot, agent, chatflow and completion apps."""

    metadata: dict[str, Any] = field(default_factory=dict)
    files: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)  # 1.x: the answer's files


@dataclass(frozen=True)
class WorkflowFinished(DifyEvent):
    """Terminal for workflow apps. In chatflows 0.15 sends `message_end` after it, 1.x before it (and not at all
    when the run was stopped or failed)."""

    status: str = ""  # succeeded | failed | stopped | partial-succeeded
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    files: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)  # 1.x: files among the outputs


@dataclass(frozen=True)
class HumanInputRequired(DifyEvent):
    """A Human Input node waits for a person; `workflow_paused` follows and the stream closes."""

    form: HumanInputForm | None = field(default=None, compare=False)


@dataclass(frozen=True)
class WorkflowPaused(DifyEvent):
    """The run paused (terminal for this stream): the forms it waits on."""

    forms: tuple[HumanInputForm, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class OtherEvent(DifyEvent):
    """Anything else: workflow_started, node_finished, tts_message, ping, unknown future events."""

    data: dict[str, Any] = field(default_factory=dict, compare=False)


class _Ids(TypedDict):
    """DifyEvent's own fields, as every event's constructor takes them."""

    event: str
    conversation_id: str
    message_id: str
    task_id: str
    workflow_run_id: str


def _ids(obj: dict[str, Any]) -> _Ids:
    return {
        "event": str(obj.get("event", "")),
        "conversation_id": str(obj.get("conversation_id") or ""),
        "message_id": str(obj.get("message_id") or obj.get("id") or ""),
        "task_id": str(obj.get("task_id") or ""),
        "workflow_run_id": str(obj.get("workflow_run_id") or ""),
    }


def parse_event(obj: dict[str, Any]) -> DifyEvent:
    """Map one decoded chunk to a typed event. Never raises on unknown or oddly shaped events."""
    name = str(obj.get("event", ""))
    ids = _ids(obj)
    data = _object(obj.get("data"))
    if name in ("message", "agent_message"):
        return TextDelta(**ids, text=str(obj.get("answer") or ""))
    if name == "text_chunk":
        return TextDelta(**ids, text=str(data.get("text") or ""))
    if name == "message_replace":
        # a replay of the answer saved so far (the events route's snapshot) says no reason; moderation does
        replayed = obj.get("reason") == ""
        return TextReplace(**ids, text=str(obj.get("answer") or ""), moderated=not replayed)
    if name == "text_replace":
        return TextReplace(**ids, text=str(data.get("text") or ""))
    if name == "reasoning_chunk":
        return ReasoningDelta(**ids, text=str(data.get("reasoning") or ""), is_final=data.get("is_final") is True)
    if name == "agent_thought":
        ids["message_id"] = str(obj.get("message_id") or "")
        try:
            position = int(obj.get("position") or 0)
        except (TypeError, ValueError):
            position = 0
        return AgentThought(
            **ids,
            position=position,
            thought=str(obj.get("thought") or ""),
            tool=str(obj.get("tool") or ""),
            observation=str(obj.get("observation") or ""),
        )
    if name == "node_started":
        return NodeStarted(**ids, title=str(data.get("title") or ""), node_type=str(data.get("node_type") or ""))
    if name in STEP_EVENTS:
        title = data.get("label") if name == "agent_log" else data.get("title")
        index = data.get("retry_index") if name == "node_retry" else data.get("index")
        return StepEvent(
            **ids, kind=name, title=str(title or ""), index=_int(index), status=str(data.get("status") or "")
        )
    if name == "human_input_required":
        return HumanInputRequired(**ids, form=parse_form(data))
    if name == "workflow_paused":
        return WorkflowPaused(**ids, forms=forms_of_pause(data))
    if name == "message_file":
        ids["message_id"] = str(obj.get("message_id") or "")
        return MessageFile(
            **ids,
            url=str(obj.get("url") or ""),
            file_type=str(obj.get("type") or ""),
            belongs_to=str(obj.get("belongs_to") or ""),
        )
    if name == "message_end":
        return MessageEnd(**ids, metadata=_object(obj.get("metadata")), files=_files(obj.get("files")))
    if name == "workflow_finished":
        return WorkflowFinished(
            **ids, status=str(data.get("status") or ""), outputs=_object(data.get("outputs")),
            error=str(data.get("error") or ""), files=_files(data.get("files")),
        )  # fmt: skip
    return OtherEvent(**ids, data=obj)


def _object(value: Any) -> dict[str, Any]:
    """A JSON object of the chunk, or {} where it has another shape (or none)."""
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _files(value: Any) -> tuple[Mapping[str, Any], ...]:
    return tuple(item for item in value if isinstance(item, Mapping)) if isinstance(value, list) else ()


def text_from_outputs(outputs: dict[str, Any]) -> str:
    """The answer text of a workflow run whose End node did not stream: `text`, `answer`, `output`, `result`,
    else the only string output, else all string outputs, one per line."""
    for key in ("text", "answer", "output", "result"):
        value = outputs.get(key)
        if isinstance(value, str) and value:
            return value
    strings = [v for v in outputs.values() if isinstance(v, str) and v]
    return "\n\n".join(strings)


# --- not from Dify: what the protected answer source (dify/protected.py) adds to the stream -------------------


@dataclass(frozen=True)
class Queued(DifyEvent):
    """The answer waits for its turn at Dify (dingdifyd's bound on answers in flight): `ahead` go first."""

    ahead: int = 0


@dataclass(frozen=True)
class Admitted(DifyEvent):
    """A queued answer's turn has come: Dify is asked now."""
