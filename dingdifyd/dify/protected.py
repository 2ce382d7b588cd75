"""The user's Dify protected from bursts: the answer source the bridge streams from, around GuardedAnswers.

Per Dify base URL, shared by every app of the bot process that uses it (and, through the slot table, by every
process of the host or, with Redis, of every host):
- at most `dify_max_concurrency` answers in flight; the others wait in a fair queue (dify/gate.py), and their
  stream says so (`Queued` with the place, whenever it changes; `Admitted` when the turn comes). The wait is
  no part of any Dify timeout: the answer's own stream, and its timeouts, start when it is admitted;
- a failure before any part of the answer that another try may get past (5xx, refused or reset connections,
  an exhausted pool: dify/overload.py) is tried once more, after a short jittered pause, in the same slot;
- a circuit breaker (pacing/circuit.py): when most recent requests failed, answers fail at once with
  DifyOverloaded (those waiting too) instead of each waiting out a timeout; after a cool-down one answer
  probes, and its success closes the circuit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dingdifyd.dify.events import (
    Admitted,
    DifyEvent,
    MessageFile,
    Queued,
    TextDelta,
    TextReplace,
    WorkflowFinished,
)
from dingdifyd.dify.gate import POLL_EVERY, DifyGate
from dingdifyd.dify.overload import is_overload, retry_delay, worth_retrying
from dingdifyd.errors import DifyError, DifyOverloaded, DifyQueueFull
from dingdifyd.pacing.circuit import CircuitBreaker, CircuitSettings, CircuitState
from dingdifyd.store.slots import LocalSlots, SlotTable

log = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 10
MAX_QUEUE_WAIT = 600.0  # seconds an answer may wait for its turn before it is given up, clearly
_ANSWER_EVENTS = (TextDelta, TextReplace, MessageFile, WorkflowFinished)  # a part of the answer: no retry after


@dataclass(frozen=True)
class ProtectionSettings:
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_queue_wait: float = MAX_QUEUE_WAIT
    poll_every: float = POLL_EVERY
    circuit: CircuitSettings = field(default_factory=CircuitSettings)


class _Answers(Protocol):
    """What is protected: an app's answer streams (GuardedAnswers, or a DifyClient)."""

    def stream_answer(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str | None = None,
        inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[DifyEvent, None]: ...


class DifyProtection:
    """The gate and the circuit of one Dify (one base URL) in this process."""

    def __init__(self, base: str, table: SlotTable, settings: ProtectionSettings, *,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.base = base
        self.settings = settings
        self.gate = DifyGate(base, settings.max_concurrency, table, poll_every=settings.poll_every)
        self.circuit = CircuitBreaker(settings.circuit, clock=clock)

    def record(self, failed: bool) -> None:
        before = self.circuit.state
        after = self.circuit.record(failed)
        if after is before:
            return
        if after is CircuitState.OPEN:
            waiting = self.gate.fail_waiting(DifyOverloaded(f"{self.base}: most recent requests failed"))
            log.error("Dify %s: most recent requests failed; not asking it for %.0f s (%d waiting answers told)",
                      self.base, self.circuit.retry_after(), waiting)  # fmt: skip
        elif after is CircuitState.CLOSED:
            log.warning("Dify %s answers again; asking it again", self.base)


class DifyProtections:
    """One DifyProtection per Dify base URL, for the bot process."""

    def __init__(self, table: SlotTable | None = None, settings: ProtectionSettings = ProtectionSettings()):
        self.table = table if table is not None else LocalSlots()
        self.settings = settings
        self._by_base: dict[str, DifyProtection] = {}

    def for_url(self, base_url: str) -> DifyProtection:
        base = base_url.rstrip("/").lower()
        if base not in self._by_base:
            self._by_base[base] = DifyProtection(base, self.table, self.settings)
        return self._by_base[base]

    @property
    def waiting(self) -> int:
        """Answers of this process waiting for their turn at a Dify."""
        return sum(protection.gate.waiting for protection in self._by_base.values())

    def close(self) -> None:
        self.table.close()


class ProtectedAnswers:
    """The bridge's AnswerSource for one app: `inner`'s answers, within its Dify's protection."""

    def __init__(self, inner: _Answers, protection: DifyProtection, *,
                 rng: Callable[[], float] = random.random):  # fmt: skip
        self.inner = inner
        self.protection = protection
        self._rng = rng

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "protection"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def stream_answer(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str | None = None,
        inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[DifyEvent, None]:
        protection = self.protection
        if not protection.circuit.allow():
            raise DifyOverloaded(f"{protection.base}: not asked, most recent requests failed "
                                 f"(again in {protection.circuit.retry_after():.0f} s)")  # fmt: skip
        probing = protection.circuit.state is CircuitState.HALF_OPEN
        recorded = False
        ticket = protection.gate.enter(user)
        try:
            waited = False
            async for ahead in self._wait(ticket):
                waited = True
                yield Queued(event="queued", ahead=ahead)
            ticket.granted.result()  # raises DifyOverloaded when the circuit opened meanwhile
            if waited:
                yield Admitted(event="admitted")
            attempt = 1
            while True:
                answered = started = False
                try:
                    stream = self.inner.stream_answer(
                        query=query, user=user, conversation_id=conversation_id, inputs=inputs, files=files
                    )
                    async with contextlib.aclosing(stream):
                        async for event in stream:
                            if not started:
                                started = recorded = True
                                protection.record(failed=False)  # Dify took the request and answers
                            answered = answered or isinstance(event, _ANSWER_EVENTS)
                            yield event
                    return
                except DifyError as exc:
                    if not started:
                        recorded = True
                        protection.record(failed=is_overload(exc))
                    if attempt > 1 or answered or not worth_retrying(exc) or not protection.circuit.allow():
                        raise
                    delay = retry_delay(self._rng)
                    log.warning("Dify %s failed before answering (%s); trying once more in %.1f s",
                                protection.base, type(exc).__name__, delay)  # fmt: skip
                    await asyncio.sleep(delay)
                    attempt += 1
        finally:
            protection.gate.leave(ticket)
            if probing and not recorded:
                protection.circuit.abandon_probe()

    async def _wait(self, ticket: Any) -> AsyncGenerator[int, None]:
        """Until the ticket's turn: its place each time it changes. Raises DifyQueueFull after too long."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.protection.settings.max_queue_wait
        shown: int | None = None
        while not ticket.granted.done():
            if ticket.place is not None and ticket.place != shown:
                shown = ticket.place
                yield shown
            ticket.changed.clear()
            changed = asyncio.ensure_future(ticket.changed.wait())
            try:
                await asyncio.wait({changed, ticket.granted}, timeout=max(0.0, deadline - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                changed.cancel()
            if not ticket.granted.done() and loop.time() >= deadline:
                raise DifyQueueFull(f"{self.protection.base}: waited {self.protection.settings.max_queue_wait:.0f} s")
