"""When to write the growing answer into the card: the pure pacing policy.

DingTalk counts every card update against a 20 calls/s per-app limit and a monthly quota, and each update carries
the whole text. So the first text goes out at once (the person sees the bot answering), later text is batched:
an update goes out once `interval` has passed since the previous one and at least `min_chars` new characters
arrived, or with any new text once `4 * interval` has passed (a slow trickle still shows). The final text is
always sent separately, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

PATIENCE = 4.0  # intervals after which even a few new characters are worth an update


@dataclass(frozen=True)
class UpdatePolicy:
    interval: float = 0.5
    min_chars: int = 8

    def delay(
        self, *, now: float, last_sent_at: float | None, sent_chars: int, current_chars: int, changed: bool
    ) -> float | None:
        """Seconds to wait before sending the current text; 0 = now; None = nothing worth sending."""
        if not changed or current_chars == 0:
            return None
        if last_sent_at is None:
            return 0.0
        elapsed = now - last_sent_at
        grown = current_chars - sent_chars
        # a replacement (moderation) can shrink the text: treat it as a full change
        if grown >= self.min_chars or grown < 0:
            return max(0.0, self.interval - elapsed)
        return max(0.0, self.interval * PATIENCE - elapsed)
