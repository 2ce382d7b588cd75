"""The answers being written right now, per session: what `/stop` and `/new` act on.

An `AnswerTurn` follows one answer's Dify stream: it records the task id Dify gives the run (the stop API
needs it), shows progress lines until the answer text starts, and ends the stream at once when stopped, even
while Dify is silent. `RunningAnswers` finds the turns of a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, cast

from dingdifyd.bridge.progress import progress_line
from dingdifyd.dify.events import (
    DifyEvent,
    MessageEnd,
    ReasoningDelta,
    TextDelta,
    TextReplace,
    WorkflowFinished,
    WorkflowPaused,
)
from dingdifyd.errors import PeerError

if TYPE_CHECKING:
    from dingdifyd.bridge.apps import DifyApp

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # the stop API is a courtesy to Dify: the card ends at once whatever it answers
STOP_GRACE = 1.0  # once Dify took the stop, it ends the stream itself (with the partial answer) within this
STOPPED = "⏹️ Stopped."
# Progress shows only once an answer keeps the person waiting: a step line replaced a moment later by the
# answer would flicker, and cost a card update of the app's monthly quota for nothing.
PROGRESS_AFTER = 0.5


_END = object()  # the stream ended, or the turn was stopped


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


async def _pump(stream: AsyncIterator[DifyEvent], queue: asyncio.Queue[object]) -> None:
    """Read the stream in a task of its own, so that a stop can end the answer while Dify is silent."""
    try:
        async for event in stream:
            queue.put_nowait(event)
    except Exception as exc:
        queue.put_nowait(_Failed(exc))
    else:
        queue.put_nowait(_END)


class AnswerTurn:
    def __init__(self, *, app: DifyApp, session_key: str, user: str, show: Callable[[str], None] | None = None):
        self.app = app
        self.session_key = session_key
        self.user = user  # the Dify user the run belongs to: the stop API wants the same
        self._show = show  # shows a progress line in the card; None: progress off
        self.task_id = ""
        self.message_id = ""
        self.answer_started = False
        self.stopped = False  # /stop: the answer ends with STOPPED
        self.detached = False  # /new: this answer must not store its conversation as the session's
        self._progress = ""  # the latest step line
        self._shown = ""  # the step line the card shows now
        self._started = asyncio.get_running_loop().time()
        self._progress_timer: asyncio.TimerHandle | None = None
        self._stop_requested = False
        self._queue: asyncio.Queue[object] | None = None

    def observe(self, event: DifyEvent) -> None:
        if event.task_id and not self.task_id:
            self.task_id = event.task_id
        if isinstance(event, TextDelta | TextReplace | MessageEnd) and event.message_id:
            self.message_id = event.message_id
        if isinstance(event, TextDelta | TextReplace | ReasoningDelta):
            # thinking counts: the card shows it (or "Thinking…") instead of a step line
            self.answer_started = self.answer_started or bool(event.text)
            return
        if isinstance(event, MessageEnd | WorkflowFinished | WorkflowPaused):
            self._cancel_progress()
            return
        line = progress_line(event)
        if self._show is None or self.answer_started or not line:
            return
        self._progress = line
        loop = asyncio.get_running_loop()
        wait = self._started + PROGRESS_AFTER - loop.time()
        if wait <= 0:
            self._show_progress()
        elif self._progress_timer is None:
            self._progress_timer = loop.call_later(wait, self._show_progress)

    def _show_progress(self) -> None:
        self._progress_timer = None
        waiting = not self.answer_started and not self._stop_requested
        if self._show is not None and waiting and self._progress != self._shown:
            self._shown = self._progress
            self._show(self._progress)

    def _cancel_progress(self) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None

    async def events(self, stream: AsyncIterator[DifyEvent]) -> AsyncIterator[DifyEvent]:
        """The stream's events, observed; ends early, without waiting for Dify, once the turn is stopped."""
        queue = self._queue = asyncio.Queue()
        pump = asyncio.create_task(_pump(stream, queue), name="dify-stream")
        try:
            while not self._stop_requested:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                event = cast(DifyEvent, item)
                self.observe(event)
                yield event
        except Exception:
            # a failure shows its note alone, not after a progress line that is no longer true
            if self._shown and not self.answer_started and self._show is not None:
                self._show("")
            raise
        finally:
            self._cancel_progress()
            self._queue = None
            pump.cancel()  # closes the response when the turn ends before the stream does
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    def request_stop(self) -> None:
        self._stop_requested = True
        self._cancel_progress()
        if self._queue is not None:
            self._queue.put_nowait(_END)

    async def stop(self) -> None:
        """Stop the run at Dify (when its task id is known) and end this answer's stream: Dify's own end of
        it when the stop was taken, else (or if that does not come soon) at once."""
        self.stopped = True
        if self.task_id:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.app.client.stop(self.task_id, self.user)
                log.info("Dify task %s stopped", self.task_id)
                asyncio.get_running_loop().call_later(STOP_GRACE, self.request_stop)
                return
            except (PeerError, TimeoutError) as exc:
                log.warning(
                    "stopping Dify task %s failed (%s); the answer ends anyway", self.task_id, type(exc).__name__
                )
        self.request_stop()


class RunningAnswers:
    def __init__(self) -> None:
        self._turns: dict[str, list[AnswerTurn]] = {}

    @contextlib.contextmanager
    def track(self, turn: AnswerTurn) -> Iterator[AnswerTurn]:
        self._turns.setdefault(turn.session_key, []).append(turn)
        try:
            yield turn
        finally:
            turns = self._turns.get(turn.session_key, [])
            if turn in turns:
                turns.remove(turn)
            if not turns:
                self._turns.pop(turn.session_key, None)

    def in_session(self, session_key: str) -> list[AnswerTurn]:
        return list(self._turns.get(session_key, ()))

    def detach_session(self, session_key: str) -> None:
        for turn in self.in_session(session_key):
            turn.detached = True

    async def stop_session(self, session_key: str) -> int:
        """Stop every answer running in the session; how many there were."""
        turns = [turn for turn in self.in_session(session_key) if not turn.stopped]
        await asyncio.gather(*(turn.stop() for turn in turns))
        return len(turns)

    def __len__(self) -> int:
        return sum(len(turns) for turns in self._turns.values())


def stopped_text(answer: str) -> str:
    return f"{answer.rstrip()}\n\n{STOPPED}" if answer.strip() else STOPPED
