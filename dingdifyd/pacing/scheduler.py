"""One card-call scheduler per DingTalk app (per bot process), shared by all its conversations.

Every card call of the app (creating a card, streaming text into it, setting its data, ending it) waits for a
turn here, so token buckets keep the app below DingTalk's 20 calls/s. DingTalk counts that limit per API, and
a burst of new conversations is first of all a burst of card creations: creations (`createAndDeliver`) have a
bucket of their own, so they proceed beside the texts of cards already open instead of taking their turns.
The writes into a card (streaming, and the card-data updates of the built-in template) share one bucket:
that is one bucket for two APIs, which stays under both limits. One queue decides the order for both.

Which card goes next: the final answer first, then card creation and first texts, then intermediate
updates; among equals the card that has been ready longest (round robin, since a served card queues again
behind the others). A card has at most one call in flight, so its writes stay in order; it asks again with
its newest text after each turn, which is where coalescing happens. After a 403 QpsLimit the whole app holds
for about a second (DingTalk's documented remedy), growing while refusals go on.

`SchedulePolicy` is the pure part (an injected clock, no I/O, no sleeping); `CardScheduler` is the thin loop
that sleeps until the policy has a turn to give and runs the card's call in a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from dingdifyd.pacing.backoff import Backoff
from dingdifyd.pacing.bucket import TokenBucket

log = logging.getLogger(__name__)


CREATE = "create"  # the API class of creating a card
WRITE = "write"  # the API class of every write into an existing card


class Priority(enum.IntEnum):
    FINAL = 0  # the answer's last write: the exact full text, or the error
    FIRST = 1  # creating the card, and its first text: the person sees the bot answering
    UPDATE = 2  # intermediate text: coalesced, and the first thing to go when calls are scarce


class TurnOutcome(enum.Enum):
    OK = "ok"
    RATE_LIMITED = "rate limited"  # DingTalk refused for its rate limit: the whole app holds
    FAILED = "failed"  # the call failed otherwise; the card deals with it
    IDLE = "idle"  # the card had nothing left to send when its turn came


@dataclass(frozen=True)
class Pacing:
    """How freely cards may be updated, set by the monthly budget (dingtalk/accounting.py)."""

    level: str = "normal"  # normal | widened | essential | final-only
    interval_factor: float = 1.0  # multiplies card_update_interval
    first_text: bool = True  # send the first text at once
    intermediate: bool = True  # send updates between the first text and the final answer


NORMAL_PACING = Pacing()


@dataclass
class _Request:
    priority: Priority
    ready_at: float
    since: float  # when it first asked: its place in the queue
    order: int  # tie-breaker: first come, first served
    api: str = WRITE  # which bucket its call takes a token from


CardT = TypeVar("CardT", bound=Hashable)


class SchedulePolicy(Generic[CardT]):
    """Which card's call goes next, and when. Cards are any hashable keys."""

    def __init__(
        self,
        *,
        qps: float | None,
        clock: Callable[[], float] = time.monotonic,
        burst: float = 1.0,
        hold_base: float = 1.0,
        hold_cap: float = 8.0,
        retry_base: float = 0.5,
        retry_cap: float = 8.0,
        rng: Callable[[], float] = random.random,
    ):
        self._clock = clock
        # burst 1: any one-second window sees at most qps + 1 calls per API, under a fixed 20/s limit per API
        self._buckets = {api: TokenBucket(qps, burst=burst, clock=clock) for api in (CREATE, WRITE)} if qps else None
        self._requests: dict[CardT, _Request] = {}
        self._busy: dict[CardT, _Request] = {}  # card -> the request whose turn it is taking
        self._hold = Backoff(hold_base, hold_cap, factor=1.5, rand=rng)
        self._retry = Backoff(retry_base, retry_cap, rand=rng)
        self._hold_until = float("-inf")
        self._order = itertools.count()

    # --- what cards ask --------------------------------------------------------------------------------

    def request(self, card: CardT, priority: Priority, ready_at: float | None = None, api: str = WRITE) -> bool:
        """Ask for a turn for `card`'s next call (of API class `api`), not before `ready_at` (default: now). A
        card has one request at a time: asking again updates it and keeps its place. Returns False when nothing
        changed."""
        now = self._clock()
        ready_at = now if ready_at is None else ready_at
        current = self._requests.get(card)
        if current is None:
            self._requests[card] = _Request(priority, ready_at, now, next(self._order), api)
            return True
        if current.priority == priority and current.ready_at == ready_at and current.api == api:
            return False
        current.priority, current.ready_at, current.api = priority, ready_at, api
        return True

    def cancel(self, card: CardT) -> None:
        self._requests.pop(card, None)

    def pending(self, card: CardT) -> bool:
        return card in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    # --- turns -----------------------------------------------------------------------------------------

    def poll(self) -> CardT | None:
        """The card whose turn it is now (its call's token taken), or None: see `wait_time`."""
        now = self._clock()
        if now < self._hold_until:
            return None
        ready = sorted(
            (request.priority, max(request.since, request.ready_at), request.order, card)
            for card, request in self._requests.items()
            if request.ready_at <= now and card not in self._busy
        )
        tried: set[str] = set()
        for *_, card in ready:
            api = self._requests[card].api
            if api in tried:
                continue  # its bucket is empty: only a card of the other API class can go now
            tried.add(api)
            if self._buckets is None or self._buckets[api].try_acquire():
                self._busy[card] = self._requests.pop(card)
                return card
        return None

    def wait_time(self) -> float | None:
        """Seconds until `poll` may give a turn; None when no card waits for one (or all wait for their own
        call to end, which `finished` reports)."""
        now = self._clock()
        waiting = [r for card, r in self._requests.items() if card not in self._busy]
        if not waiting:
            return None
        soonest = min(
            max(r.ready_at - now, self._buckets[r.api].wait_time() if self._buckets is not None else 0.0)
            for r in waiting
        )
        return max(0.0, soonest, self._hold_until - now)

    def finished(self, card: CardT, outcome: TurnOutcome) -> float:
        """The card's call is over. Returns how long the app now holds (0.0 unless it was rate limited)."""
        served = self._busy.pop(card, None)
        if outcome is TurnOutcome.OK:
            self._hold.reset()
            return 0.0
        if outcome is not TurnOutcome.RATE_LIMITED:
            return 0.0
        hold = self._hold.next_delay()
        self._hold_until = max(self._hold_until, self._clock() + hold)
        again = self._requests.get(card)
        if again is not None and served is not None and again.ready_at <= self._clock():
            # a refused card keeps its place in the queue: it has been ready since its first turn
            again.since, again.order = served.since, served.order
            again.ready_at = min(again.ready_at, served.ready_at)
        return hold

    def retry_delay(self, attempt: int) -> float:
        """Back-off before a card retries a call DingTalk failed (5xx, timeout); `attempt` counts from 1."""
        return self._retry.delay_for(max(0, attempt - 1))

    @property
    def holding_until(self) -> float:
        return self._hold_until


# --- the loop ------------------------------------------------------------------------------------------------


class Turnable(Hashable, Protocol):
    """A card that takes turns: one call per turn, then it asks again if it has more to send."""

    async def take_turn(self) -> TurnOutcome: ...


class CardScheduler:
    """The I/O side of `SchedulePolicy`: a loop task that runs while cards wait, started by the first request
    and ending when none is left (so nothing needs closing), and one short task per turn."""

    def __init__(
        self,
        qps: float | None = None,
        *,
        pacing: Callable[[], Pacing] = lambda: NORMAL_PACING,
        clock: Callable[[], float] = time.monotonic,
        hold_base: float = 1.0,
        hold_cap: float = 8.0,
        retry_base: float = 0.5,
        retry_cap: float = 8.0,
    ):
        self.policy: SchedulePolicy[Turnable] = SchedulePolicy(
            qps=qps, clock=clock, hold_base=hold_base, hold_cap=hold_cap, retry_base=retry_base, retry_cap=retry_cap,
        )  # fmt: skip
        self.clock = clock
        self._pacing = pacing
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._turns: set[asyncio.Task[None]] = set()
        self.rate_limited = 0

    @property
    def pacing(self) -> Pacing:
        return self._pacing()

    def request(self, card: Turnable, priority: Priority, ready_at: float | None = None, api: str = WRITE) -> None:
        if self.policy.request(card, priority, ready_at, api):
            self._wake.set()
        if self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._run(), name="card-scheduler")

    def cancel(self, card: Turnable) -> None:
        self.policy.cancel(card)

    def retry_at(self, attempt: int) -> float:
        return self.clock() + self.policy.retry_delay(attempt)

    async def _run(self) -> None:
        try:
            while True:
                card = self.policy.poll()
                if card is not None:
                    task = asyncio.create_task(self._turn(card), name="card-turn")
                    self._turns.add(task)
                    task.add_done_callback(self._turns.discard)
                    continue
                wait = self.policy.wait_time()
                if wait is None and not len(self.policy):
                    return  # nothing waits: the next request starts the loop again
                self._wake.clear()
                # wait=None: every waiting card has a call in flight; its end wakes us
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            self._loop = None

    async def _turn(self, card: Turnable) -> None:
        try:
            outcome = await card.take_turn()
        except Exception:
            log.exception("a card's turn failed unexpectedly")
            outcome = TurnOutcome.FAILED
        hold = self.policy.finished(card, outcome)
        if hold:
            self.rate_limited += 1
            log.debug("card calls: DingTalk's rate limit refused one; holding all card calls for %.2fs", hold)
        self._wake.set()
        if self._loop is None and len(self.policy):
            self._loop = asyncio.get_running_loop().create_task(self._run(), name="card-scheduler")
