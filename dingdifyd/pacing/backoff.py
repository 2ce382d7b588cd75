"""Exponential back-off with jitter, the one formula for every wait after a failure: the supervisor's restart
delays, the Stream's reconnects, DingTalk retries, the card scheduler's holds and retries. Pure policy; the
caller decides when to sleep or wake."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """`minimum * factor**n`, capped at `maximum`, each delay spread by ±`jitter` (a fraction of it).

    Jitter keeps several bots that failed together (a network outage) from restarting in lock-step, and many
    clients refused together from coming back together. `rand` returns a float in [0, 1); inject a constant
    for predictable tests.
    """

    minimum: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    jitter: float = 0.25
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    attempts: int = field(default=0, init=False)  # delays handed out by `next_delay` since the last reset

    def __post_init__(self) -> None:
        if self.minimum <= 0:
            raise ValueError("minimum must be > 0")
        if self.maximum < self.minimum:
            raise ValueError("maximum must be >= minimum")
        if self.factor < 1:
            raise ValueError("factor must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay_for(self, attempt: int) -> float:
        """The delay before retry number `attempt` (0-based), jittered, without changing the state."""
        try:
            nominal = min(self.maximum, self.minimum * self.factor**attempt)
        except OverflowError:  # thousands of failures in a row: long since capped
            nominal = self.maximum
        spread = nominal * self.jitter * (2.0 * self.rand() - 1.0)
        return min(self.maximum, max(0.0, nominal + spread))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts as one more failure."""
        delay = self.delay_for(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """After a success: the next delay is `minimum` again."""
        self.attempts = 0
