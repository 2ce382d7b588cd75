"""One answer's card: the bridge sets the growing text, then finishes or fails it; this object decides what the
card's next call is and asks the app's shared CardScheduler for a turn to make it.

One call per turn, at most one in flight per card, and what is sent is decided when the turn comes, so the
newest text always wins and nothing is lost: the final call carries exactly the full answer. Creating the card
does not hold up the answer (the first text waits for it instead); when the card cannot be created, or its
final call fails for good, the final text goes out as a plain reply, so the person is never left with silence.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable

from dingdifyd.bridge.ports import CardSink
from dingdifyd.errors import CardAlreadyExists, PeerError, brief
from dingdifyd.pacing.coalesce import UpdatePolicy
from dingdifyd.pacing.scheduler import CREATE, WRITE, CardScheduler, Priority, TurnOutcome

log = logging.getLogger(__name__)

# Creating and ending a card are tried this often (DingTalk busy, timeouts) before the answer goes out as a
# plain reply instead; intermediate updates are simply superseded by the next text.
MAX_ATTEMPTS = 6
# QpsLimit refusals pass (each holds the whole app, longer and longer): they are given more patience.
MAX_RATE_LIMITED = 20


class _Call(enum.Enum):
    OPEN = "create the card"
    UPDATE = "update the card"
    FINAL = "end the card"


class CardStreamer:
    """The per-answer object: `open`, `set_text` as often as the text changes, then `finish` or `fail` once."""

    def __init__(
        self,
        card: CardSink,
        policy: UpdatePolicy,
        plain_reply: Callable[[str], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        *,
        scheduler: CardScheduler | None = None,
    ):
        self._card = card
        self._policy = policy
        self._plain_reply = plain_reply
        self._clock = clock
        # Without a shared scheduler (the terminal chat) the card still gets one, unlimited, of its own.
        self._scheduler = scheduler if scheduler is not None else CardScheduler(clock=clock)
        self._text = ""  # as the bridge set it: the raw answer so far, rendered only when a turn sends it
        self._render: Callable[[str], str] = str
        self._sent = ""
        self._shown = ""  # the rendered text the card shows
        self._sent_at: float | None = None
        self._opened: bool | None = None  # None: not yet; False: given up on the card
        self._open_wanted = False
        self._already_exists_ok = False
        self._maybe_created = False  # a create attempt failed in a way that may have created the card
        self._ending: tuple[str, bool] | None = None  # (final text, is an error)
        self._final: asyncio.Future[bool] | None = None  # True: the card shows the final text
        self._in_turn = False
        self._updates_broken = False
        self._failed_call: _Call | None = None
        self._attempts = 0  # consecutive failures of `_failed_call`
        self._refusals = 0  # consecutive rate-limit refusals of `_failed_call`
        self._retry_at: float | None = None
        self.closed = False
        self._abandoned = False
        self.calls = 0  # card calls made for this answer (each attempt counts: DingTalk counts them too)
        self.updates_sent = 0
        self.delivered_by: str | None = None  # "card", "reply", or None (not delivered)
        self.first_shown_at: float | None = None  # when the person first saw text of this answer (clock time)

    @property
    def text(self) -> str:
        """What the card shows, or is about to: the final text once ended, else the answer so far, rendered."""
        return self._text if self.closed else self._render(self._text)

    def render_with(self, render: Callable[[str], str]) -> None:
        """Turn the raw text into card text only when an update is made: an answer grows token by token, and
        rendering each token's version (markdown adaptation is linear in the text) would be quadratic."""
        self._render = render

    # --- what the bridge calls -------------------------------------------------------------------------

    async def open(self, *, already_exists_ok: bool = False) -> None:
        """Ask for the card to be created; returns at once (the first text waits for the card, not the answer)."""
        self._open_wanted = True
        self._already_exists_ok = already_exists_ok
        if not self._card.available:
            self._opened = False
            return
        self._reschedule()

    def set_text(self, text: str) -> None:
        if text != self._text and not self.closed:
            self._text = text
            self._reschedule()

    def abandon(self) -> None:
        """Never write this card again, not even to end it: another process takes the answer over (this one
        lost its lease on the shared store). Whatever was asked of the scheduler is withdrawn."""
        self.closed = True
        self._abandoned = True
        self._scheduler.cancel(self)
        self._settle(False)

    async def finish(self, text: str) -> None:
        await self._end(text, error=False)

    async def fail(self, text: str) -> None:
        await self._end(text, error=True)

    async def _end(self, text: str, *, error: bool) -> None:
        if self.closed or self._abandoned:
            return
        self.closed = True
        self._text = text
        self._ending = (text, error)
        if self._open_wanted and self._opened is not False:
            self._final = asyncio.get_running_loop().create_future()
            self._reschedule()
            # shielded: a cancelled answer still gets its final call, which the scheduler goes on to make
            if await asyncio.shield(self._final):
                self.delivered_by = "card"
                return
            if self._abandoned:
                return
        try:
            await self._plain_reply(text)
            self.delivered_by = "reply"
            self._shown_now()
        except PeerError as exc:
            log.error("the answer could not be delivered at all: card and plain reply failed (%s)", brief(exc))

    # --- turns -----------------------------------------------------------------------------------------

    def _next_call(self) -> _Call | None:
        if not self._open_wanted or self._opened is False or self._abandoned:
            return None
        if self._opened is None:
            return _Call.OPEN
        if self._ending is not None:
            return _Call.FINAL if self._final is not None and not self._final.done() else None
        if self._text and self._text != self._sent and not self._updates_broken:
            return _Call.UPDATE
        return None

    def _reschedule(self) -> None:
        """Tell the scheduler what this card wants next: nothing, or a turn with a priority, not before a time."""
        if self._in_turn:
            return  # the turn asks again when it ends
        call = self._next_call()
        ready_at = self._retry_at
        if call is _Call.UPDATE:
            priority, not_before = self._update_slot()
            if priority is None:
                call = None
            elif not_before is not None:
                ready_at = max(ready_at or not_before, not_before)
        else:
            priority = Priority.FINAL if call is _Call.FINAL else Priority.FIRST
        if call is None or priority is None:
            self._scheduler.cancel(self)
        else:
            self._scheduler.request(self, priority, ready_at, CREATE if call is _Call.OPEN else WRITE)

    def _update_slot(self) -> tuple[Priority | None, float | None]:
        """The priority and earliest time of the next text update; no priority when the budget says not now."""
        pacing = self._scheduler.pacing
        if self._sent_at is None:
            return (Priority.FIRST, None) if pacing.first_text else (None, None)
        if not pacing.intermediate:
            return None, None
        # UpdatePolicy asked at the moment of the last update gives the whole wait, so the time is stable
        wait = self._policy.delay(
            now=self._sent_at, last_sent_at=self._sent_at, sent_chars=len(self._sent),
            current_chars=len(self._text), changed=True,
        )  # fmt: skip
        return Priority.UPDATE, self._sent_at + (wait or 0.0) * pacing.interval_factor

    async def take_turn(self) -> TurnOutcome:
        """Called by the scheduler: make this card's next call with the newest text."""
        call = self._next_call()
        if call is _Call.UPDATE:
            shown = self._render(self._text)
            if not shown or shown == self._shown:
                # nothing new to show (e.g. an image link still being written): no call, no quota spent
                self._sent = self._text
                self._reschedule()
                return TurnOutcome.IDLE
        if call is None:
            return TurnOutcome.IDLE
        self._in_turn = True
        self.calls += 1
        try:
            await self._make(call)
        except PeerError as exc:
            outcome = self._failed(call, exc)
        except Exception as exc:
            # a bug, not DingTalk: treated as a refusal for good, so the answer still goes out as a reply
            log.exception("card call failed unexpectedly (%s)", call.value)
            outcome = self._failed(call, exc)
        else:
            outcome = TurnOutcome.OK
            self._failed_call, self._retry_at = None, None
        finally:
            self._in_turn = False
        self._reschedule()
        return outcome

    async def _make(self, call: _Call) -> None:
        if call is _Call.OPEN:
            try:
                await self._card.open()
            except CardAlreadyExists:
                if not (self._already_exists_ok or self._maybe_created):
                    raise
                # resuming an answer whose card an earlier process created, or our own earlier attempt did
            self._opened = True
        elif call is _Call.FINAL:
            assert self._ending is not None
            text, error = self._ending
            await (self._card.fail(text) if error else self._card.finish(text))
            self._shown_now()
            self._settle(True)
        else:
            snapshot = self._text
            shown = self._render(snapshot)
            await self._card.update(shown)
            self._sent, self._shown, self._sent_at = snapshot, shown, self._clock()
            self.updates_sent += 1
            self._shown_now()

    def _failed(self, call: _Call, exc: Exception) -> TurnOutcome:
        rate_limited = isinstance(exc, PeerError) and exc.rate_limited
        retryable = isinstance(exc, PeerError) and exc.retryable  # anything else is a bug: refused for good
        outcome = TurnOutcome.RATE_LIMITED if rate_limited else TurnOutcome.FAILED
        if call is _Call.OPEN and retryable and not rate_limited:
            self._maybe_created = True  # DingTalk may have created it before failing: a retry may see it exist
        if self._failed_call is not call:
            self._failed_call, self._attempts, self._refusals = call, 0, 0
        if rate_limited:
            self._refusals += 1
        else:
            self._attempts += 1
        patient = self._refusals < MAX_RATE_LIMITED and self._attempts < MAX_ATTEMPTS
        if retryable and (call is _Call.UPDATE or patient):
            # rate limits hold the whole app (the scheduler's business); other failures back off this card
            self._retry_at = None if rate_limited else self._scheduler.retry_at(self._attempts)
            log.debug("card call failed (%s); retrying: %s", call.value, brief(exc))
            return outcome
        self._retry_at = None
        if call is _Call.OPEN:
            if not retryable and self._card.fall_back(exc):
                self._failed_call = None
                return outcome  # the card switched to its next way of being shown: create that
            self._opened = False
            log.info("card could not be created (%s); the answer will be sent as a plain reply", brief(exc))
            self._settle(False)
        elif call is _Call.FINAL:
            log.info("final card update failed (%s); sending a plain reply instead", brief(exc))
            self._settle(False)
        else:
            # later updates would fail alike (e.g. content too large); the final call still tries
            self._updates_broken = True
            log.info("card update failed (%s); the card waits for the final answer", brief(exc))
        return outcome

    def _shown_now(self) -> None:
        if self.first_shown_at is None:
            self.first_shown_at = self._clock()

    def _settle(self, delivered: bool) -> None:
        if self._final is not None and not self._final.done():
            self._final.set_result(delivered)
