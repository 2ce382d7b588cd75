"""Pure pacing policy for DingTalk calls: a token bucket that keeps one app under its QPS limit, and the
exponential back-off with jitter used after a refusal or a dropped connection. No I/O and no sleeping here:
callers ask how long to wait and do the waiting themselves, so both are testable with a fake clock."""

from __future__ import annotations

import random
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


class ExponentialBackoff:
    """Delays `base * factor**n`, capped at `cap`, each scaled by a random factor in [1 - jitter, 1 + jitter]
    (and capped again), so many clients refused together do not come back together."""

    def __init__(
        self,
        *,
        base: float = 1.0,
        factor: float = 2.0,
        cap: float = 60.0,
        jitter: float = 0.25,
        rng: Callable[[], float] = random.random,
    ):
        if base < 0 or cap < 0 or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("invalid back-off parameters")
        self.base = base
        self.factor = factor
        self.cap = cap
        self.jitter = jitter
        self._rng = rng
        self.attempt = 0

    def delay_for(self, attempt: int) -> float:
        """The delay before retry number `attempt` (0-based), without changing the state."""
        nominal = min(self.cap, self.base * self.factor**attempt)
        spread = 1.0 + self.jitter * (2.0 * self._rng() - 1.0)
        return min(self.cap, nominal * spread)

    def next_delay(self) -> float:
        delay = self.delay_for(self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
