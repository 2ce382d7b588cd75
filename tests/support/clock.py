"""A clock a test moves by hand, for the pure policies that take a `clock` callable."""

from __future__ import annotations


class FakeClock:
    """`clock()` reads it; `clock.now = t` or `clock.advance(seconds)` moves it. Nothing else moves it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
