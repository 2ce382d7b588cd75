"""The bound on answers in flight at one Dify, and the fair queue in front of it: the I/O around the pure
parts (pacing/fairqueue.py) and the slot table shared with the other processes (store/slots.py).

One gate per Dify base URL per bot process. An answer enters with its person and gets a ticket; one
dispatcher task gives the head of the queue a slot as soon as the table has one for this process (when an
answer of this process ends at once, else by asking again every POLL_EVERY seconds, since the others' ends are
not heard), and tells each waiting ticket its place whenever that changes. The slots held are renewed while
held. A table that fails (a locked file, Redis out of reach) is logged once, and the bound is then kept by
this process alone until it works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dingdifyd.errors import StoreUnavailable
from dingdifyd.pacing.fairqueue import FairQueue
from dingdifyd.store.slots import SLOT_LEASE, SlotTable

log = logging.getLogger(__name__)

POLL_EVERY = 0.25  # seconds between two asks for a slot while answers wait (the others' ends are not heard)


@dataclass(eq=False)
class Ticket:
    """One answer waiting for (then holding) a slot. `place`: answers of this process ahead of it."""

    person: str
    since: float  # wall clock: compared with other processes' waiters
    granted: asyncio.Future[str]
    place: int | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    number: int = 0


class DifyGate:
    def __init__(
        self,
        base: str,
        limit: int,
        table: SlotTable,
        *,
        poll_every: float = POLL_EVERY,
        renew_every: float = SLOT_LEASE / 3,
        wall: Callable[[], float] = time.time,
    ):
        self.base = base
        self.limit = limit
        self.table = table
        self.poll_every = poll_every
        self.renew_every = renew_every
        self._wall = wall
        self._queue: FairQueue[Ticket] = FairQueue()
        self._held: set[str] = set()
        self._local_ids = itertools.count(1)
        self._numbers = itertools.count(1)
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._table_failing = False

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._held)

    def enter(self, person: str) -> Ticket:
        """Queue an answer of `person`; its ticket's `granted` resolves to a slot id when it may go."""
        ticket = Ticket(person, self._wall(), asyncio.get_running_loop().create_future(), number=next(self._numbers))
        self._queue.add(person, ticket)
        self._kick()
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """An answer gives up waiting (or holding): its place, or its slot, goes to the next."""
        if self._queue.remove(ticket):
            self._kick()
        elif ticket.granted.done() and not ticket.granted.cancelled() and ticket.granted.exception() is None:
            self.release(ticket.granted.result())
        if not ticket.granted.done():
            ticket.granted.cancel()

    def release(self, slot: str) -> None:
        if slot not in self._held:
            return
        self._held.discard(slot)
        if not slot.startswith("local-"):
            with contextlib.suppress(StoreUnavailable):  # the lease frees it, should the table fail now
                self.table.release(self.base, slot)
        self._kick()

    def fail_waiting(self, error: BaseException) -> int:
        """Every waiting answer fails with `error` at once (the circuit opened: Dify is not to be asked)."""
        failed = 0
        while (ticket := self._queue.pop()) is not None:
            if not ticket.granted.done():
                ticket.granted.set_exception(error)
                failed += 1
        self._kick()
        return failed

    # --- the dispatcher ----------------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name=f"gate {self.base}")
        if self._held and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name=f"slots {self.base}")

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while len(self._queue):
            self._wake.clear()
            head = self._queue.head()
            assert head is not None
            slot = self._take_slot(head.since)
            if slot is not None:
                self._queue.pop()
                self._held.add(slot)
                if head.granted.done():  # it gave up at the very moment: the slot goes back
                    self.release(slot)
                else:
                    head.granted.set_result(slot)
                    if self._keeper is None or self._keeper.done():
                        self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="slots")
                continue
            self._tell_places()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_every)
        self._tell_places()
        with contextlib.suppress(StoreUnavailable):
            self.table.stop_waiting(self.base)

    def _take_slot(self, since: float) -> str | None:
        try:
            slot = self.table.try_acquire(self.base, self.limit, since)
        except StoreUnavailable as exc:
            if not self._table_failing:
                self._table_failing = True
                log.error("the Dify slot table failed (%s); at most %d answers at %s from this process alone "
                          "until it works again", exc, self.limit, self.base)  # fmt: skip
            held_locally = sum(1 for slot in self._held if slot.startswith("local-"))
            return f"local-{next(self._local_ids)}" if held_locally < self.limit else None
        if self._table_failing:
            self._table_failing = False
            log.info("the Dify slot table works again")
        return slot

    def _tell_places(self) -> None:
        for ticket, ahead in self._queue.places().items():
            if ticket.place != ahead:
                ticket.place = ahead
                ticket.changed.set()

    async def _keep(self) -> None:
        """Renew the leases of the slots held (and the record that this process waits) while there are any."""
        while self._held or len(self._queue):
            await asyncio.sleep(self.renew_every)
            head = self._queue.head()
            shared = [slot for slot in self._held if not slot.startswith("local-")]
            with contextlib.suppress(StoreUnavailable):
                self.table.renew(self.base, shared, head.since if head is not None else None)
