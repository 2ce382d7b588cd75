"""What the card shows while the Dify app works, and what follows the answer: the pure text rules.

Until the first answer text arrives, an agent's tool calls and a workflow's steps are shown as one line
("🔧 Using current_time…", "⏳ Search the knowledge base…"), so a person waiting on a slow app sees it is alive;
Dify 1.x's retries, iteration and loop rounds, and agent strategy logs too ("🔁 Retrying Search (attempt 2)…").
The answer text replaces that line. Suggested follow-up questions, when the app offers them, are appended to the
final answer as a short list.
"""

from __future__ import annotations

from collections.abc import Sequence

from dingdifyd.bridge.markdown import neutralise_links
from dingdifyd.dify.events import AgentThought, DifyEvent, NodeStarted, StepEvent

# Steps that say nothing to the person: every run has them, and the answer node starts when the answer does.
QUIET_NODE_TYPES = frozenset({"start", "end", "answer"})
MAX_TITLE = 60
SUGGESTIONS_HEADING = "**You could also ask:**"

TOOL_LINE = "🔧 Using {tools}…"
NODE_LINE = "⏳ {title}…"
RETRY_LINE = "🔁 Retrying {title} (attempt {attempt})…"
ROUND_LINE = "⏳ {title} (round {number})…"
AGENT_STEP_LINE = "🔧 {label}…"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_TITLE else text[: MAX_TITLE - 1] + "…"


def progress_line(event: DifyEvent) -> str | None:
    """The line to show for a step event, or None when the event is not a step worth showing."""
    if isinstance(event, AgentThought):
        tools = [name.strip() for name in event.tool.split(";") if name.strip()]
        return TOOL_LINE.format(tools=_short(", ".join(tools))) if tools else None
    if isinstance(event, NodeStarted):
        if event.node_type in QUIET_NODE_TYPES or not event.title.strip():
            return None
        return NODE_LINE.format(title=_short(event.title))
    if isinstance(event, StepEvent) and event.title.strip():
        return _step_line(event)
    return None


def _step_line(event: StepEvent) -> str | None:
    title = _short(event.title)
    if event.kind == "node_retry":
        # Dify counts retries from 1: the first retry is the second attempt
        return RETRY_LINE.format(title=title, attempt=max(event.index, 1) + 1)
    if event.kind in ("iteration_next", "loop_next"):
        return ROUND_LINE.format(title=title, number=event.index + 1)
    if event.kind in ("iteration_started", "loop_started"):
        return NODE_LINE.format(title=title)
    if event.kind == "agent_log" and event.status in ("", "start"):
        return AGENT_STEP_LINE.format(label=title)
    return None


def with_suggestions(answer: str, questions: Sequence[str]) -> str:
    """The answer followed by the suggested questions (at most three, one line each)."""
    lines = [f"- {neutralise_links(' '.join(q.split()))}" for q in questions if q.strip()][:3]  # the model's words
    if not lines or not answer.strip():
        return answer
    return f"{answer.rstrip()}\n\n---\n{SUGGESTIONS_HEADING}\n\n" + "\n".join(lines)
