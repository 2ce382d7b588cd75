"""When a Dify mostly fails, stop hammering it: a circuit breaker. Pure: an injected clock, no I/O.

    closed --most recent requests failed--> open --cool-down over--> half-open (one probe goes through)
    half-open --probe answered--> closed        half-open --probe failed--> open (a longer cool-down)

While open, answers fail at once with a clear message instead of each waiting out a timeout against a Dify
that is down, and Dify gets the quiet it needs to recover. What counts as a failure is Dify not coping
(5xx, unreachable, its database pool exhausted: see dify/overload.py); an answer refused for its content, or
an LLM error inside a running stream, shows that Dify itself answers.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True)
class CircuitSettings:
    window: int = 10  # the most recent requests looked at
    window_seconds: float = 60.0  # ... and no older than this
    min_requests: int = 4  # fewer than this never open the circuit
    failure_ratio: float = 0.5  # "most": at least this share of them failed
    open_for: float = 15.0  # the first cool-down
    max_open_for: float = 120.0  # cool-downs double while probes fail, up to this


class CircuitBreaker:
    def __init__(self, settings: CircuitSettings = CircuitSettings(), *, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self.state = CircuitState.CLOSED
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=settings.window)  # (when, failed)
        self._open_until = 0.0
        self._cool_down = settings.open_for
        self._probe_out = False

    def allow(self) -> bool:
        """Whether a request may go to Dify now. In half-open, only the first caller (the probe) may."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and self._clock() >= self._open_until:
            self.state = CircuitState.HALF_OPEN
            self._probe_out = False
        if self.state is CircuitState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def record(self, failed: bool) -> CircuitState:
        """The outcome of a request that was allowed; returns the state after it."""
        now = self._clock()
        if self.state is CircuitState.HALF_OPEN:
            self._probe_out = False
            if failed:
                self._cool_down = min(self._cool_down * 2, self.settings.max_open_for)
                self._open(now)
            else:
                self.state = CircuitState.CLOSED
                self._outcomes.clear()
                self._cool_down = self.settings.open_for
            return self.state
        if self.state is CircuitState.OPEN:
            return self.state  # a request that started before it opened
        self._outcomes.append((now, failed))
        recent = [bad for when, bad in self._outcomes if now - when <= self.settings.window_seconds]
        if len(recent) >= self.settings.min_requests and sum(recent) >= self.settings.failure_ratio * len(recent):
            self._open(now)
        return self.state

    def abandon_probe(self) -> None:
        """The probe ended without an outcome (cancelled): the next caller may probe."""
        if self.state is CircuitState.HALF_OPEN:
            self._probe_out = False

    def retry_after(self) -> float:
        """Seconds until a request may be tried again (0 when it may now)."""
        if self.state is CircuitState.OPEN:
            return max(0.0, self._open_until - self._clock())
        return 0.0

    def _open(self, now: float) -> None:
        self.state = CircuitState.OPEN
        self._open_until = now + self._cool_down
        self._outcomes.clear()
