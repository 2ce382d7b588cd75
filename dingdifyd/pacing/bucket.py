"""Pure pacing policy for DingTalk calls: a token bucket that keeps one app under its QPS limit (the back-off
after a refusal is backoff.py's). No I/O and no sleeping here: callers ask how long to wait and do the waiting
themselves, so it is testable with a fake clock."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` calls per second with bursts of at most `burst`.

    `try_acquire()` takes a slot when one is free now, `wait_time()` says when the next one will be. A burst of
    1 keeps any one-second window at no more than `rate + 1` calls, which is what a fixed 20/s server-side limit
    needs.
    """

    def __init__(self, rate: float, *, burst: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        return now

    def try_acquire(self) -> bool:
        """Take one slot only if it is available now."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until a slot is available (0.0: one is available now), without taking it."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)
