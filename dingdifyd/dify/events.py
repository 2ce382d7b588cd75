"""Typed Dify stream events, and the pure function that turns one decoded SSE `data:` JSON object into one.

Only what the bridge acts on gets its own type; every other event (node_finished, tts_*, iteration_*, ...)
becomes `OtherEvent` and is harmless. `error` events are not returned: the client raises them as DifyError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    """`message_replace` / `text_replace` (moderation): the whole answer so far becomes `text`."""

    text: str = ""


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
class MessageFile(DifyEvent):
    url: str = ""  # often relative and signed: /files/tools/<uuid>.png?timestamp=...
    file_type: str = ""
    belongs_to: str = ""


@dataclass(frozen=True)
class MessageEnd(DifyEvent):
    """Terminal for chatbot, agent, chatflow and completion apps."""

    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkflowFinished(DifyEvent):
    """Terminal for workflow apps; in chatflow apps `message_end` follows it."""

    status: str = ""  # succeeded | failed | stopped | partial-succeeded
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class OtherEvent(DifyEvent):
    """Anything else: workflow_started, node_finished, tts_message, ping, unknown future events."""

    data: dict[str, Any] = field(default_factory=dict, compare=False)


def _ids(obj: dict[str, Any]) -> dict[str, str]:
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
    data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
    if name in ("message", "agent_message"):
        return TextDelta(**ids, text=str(obj.get("answer") or ""))
    if name == "text_chunk":
        return TextDelta(**ids, text=str(data.get("text") or ""))
    if name == "message_replace":
        return TextReplace(**ids, text=str(obj.get("answer") or ""))
    if name == "text_replace":
        return TextReplace(**ids, text=str(data.get("text") or ""))
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
    if name == "message_file":
        ids["message_id"] = str(obj.get("message_id") or "")
        return MessageFile(
            **ids,
            url=str(obj.get("url") or ""),
            file_type=str(obj.get("type") or ""),
            belongs_to=str(obj.get("belongs_to") or ""),
        )
    if name == "message_end":
        metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        return MessageEnd(**ids, metadata=metadata)
    if name == "workflow_finished":
        outputs = data.get("outputs") if isinstance(data.get("outputs"), dict) else {}
        return WorkflowFinished(
            **ids, status=str(data.get("status") or ""), outputs=outputs, error=str(data.get("error") or "")
        )
    return OtherEvent(**ids, data=obj)


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
