"""How one message's handling ended, as the bridge reports it (`BridgeService(on_answer=...)`): what the bot's
status and metrics are made of (worker/stats.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerReport:
    outcome: str  # answered | failed | interrupted | refused
    seconds: float = 0.0  # from the start of its handling to the final answer
    first_text_seconds: float | None = None  # to the first text the person saw; None: nothing shown
    error: BaseException | None = None
    dify_answered: bool = False  # the answer came from Dify (not a chat command, not a refusal)
