"""What the card shows while the Dify app works, and what follows the answer: the pure text rules.

Until the first answer text arrives, an agent's tool calls and a workflow's steps are shown as one line
("🔧 Using current_time…", "⏳ Search the knowledge base…"), so a person waiting on a slow app sees it is alive.
The answer text replaces that line. Suggested follow-up questions, when the app offers them, are appended to the
final answer as a short list.
"""

from __future__ import annotations

from collections.abc import Sequence

from dingdifyd.bridge.markdown import neutralise_links
from dingdifyd.dify.events import AgentThought, DifyEvent, NodeStarted

# Steps that say nothing to the person: every run has them, and the answer node starts when the answer does.
QUIET_NODE_TYPES = frozenset({"start", "end", "answer"})
MAX_TITLE = 60
SUGGESTIONS_HEADING = "**You could also ask:**"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_TITLE else text[: MAX_TITLE - 1] + "…"


def progress_line(event: DifyEvent) -> str | None:
    """The line to show for a step event, or None when the event is not a step worth showing."""
    if isinstance(event, AgentThought):
        tools = [name.strip() for name in event.tool.split(";") if name.strip()]
        return f"🔧 Using {_short(', '.join(tools))}…" if tools else None
    if isinstance(event, NodeStarted):
        if event.node_type in QUIET_NODE_TYPES or not event.title.strip():
            return None
        return f"⏳ {_short(event.title)}…"
    return None


def with_suggestions(answer: str, questions: Sequence[str]) -> str:
    """The answer followed by the suggested questions (at most three, one line each)."""
    lines = [f"- {neutralise_links(' '.join(q.split()))}" for q in questions if q.strip()][:3]  # the model's words
    if not lines or not answer.strip():
        return answer
    return f"{answer.rstrip()}\n\n---\n{SUGGESTIONS_HEADING}\n\n" + "\n".join(lines)
