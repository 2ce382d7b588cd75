"""Answers that outlive their stream, and Dify tasks that do not outlive their answer.

`GuardedAnswers` wraps a DifyClient as the bridge's AnswerSource and adds what the plain stream cannot:

- A chatflow or workflow run goes on inside Dify when its stream dies (a reverse proxy's 60 s timeout, a
  dropped connection, a silent socket). Once the stream has named its `workflow_run_id`, a cut or an idle
  timeout is not the end. On a Dify with the run events route (≥ 1.14) the run is followed there
  (dify/following.py), chatflows too, and so is the run of an answer whose process died (`follow_run`).
  Elsewhere (0.x) a workflow's run record (`GET /workflows/run/:id`) is polled until the run finishes, within
  what is left of the total timeout, and the answer is finished from its outputs (as a `TextReplace`, since the
  text streamed before the cut may be partial, then the run's `WorkflowFinished`).
- An answer given up on is stopped in Dify too (`POST .../:task_id/stop` with the same user), so that the
  app does not go on spending tokens for nobody: when the bot cancels it (stopping), when the idle or total
  timeout fires, when a chat stream is cut, or when a workflow cannot be followed to its end.
- A workflow whose stream ends `stopped` with no outputs is read once more before the person is told it was
  stopped: Dify 1.16.1 ends a resumed workflow so while its run record holds the outputs (fixtures 62, 66b).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard

from dingdifyd.dify.client import DifyClient, ends_answer_stream
from dingdifyd.dify.events import DifyEvent, TextDelta, TextReplace, WorkflowFinished, text_from_outputs
from dingdifyd.dify.following import UNAVAILABLE_STATUSES, follow_run_events
from dingdifyd.errors import (
    DifyAuthError,
    DifyError,
    DifyStreamCut,
    DifyTimeout,
    DifyTotalTimeout,
    FormAnswerRefused,
    RunNotFollowable,
)

log = logging.getLogger(__name__)

STOP_BOUND = 5.0  # seconds a stop request may take: a courtesy to Dify, never worth holding an answer up
FINISHED_STATUSES = ("succeeded", "partial-succeeded")
ENDED_STATUSES = (*FINISHED_STATUSES, "failed", "stopped")


@dataclass(frozen=True)
class PollSchedule:
    """Delays between two reads of a run record: quick at first (the run may be nearly done), then patient."""

    first: float = 1.0
    factor: float = 2.0
    cap: float = 10.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(self.cap, delay * self.factor)


def run_outputs(record: dict[str, Any]) -> dict[str, Any]:
    """The outputs of a run record: a JSON string in Dify 0.x (transcript 84), an object in 1.x."""
    outputs = record.get("outputs")
    if isinstance(outputs, str):
        try:
            outputs = json.loads(outputs)
        except ValueError:
            return {"text": outputs}
    return outputs if isinstance(outputs, dict) else {}


class _Progress:
    """What one answer's stream has shown so far: enough to follow it up or stop it."""

    def __init__(self, task_id: str = "", workflow_run_id: str = "") -> None:
        self.task_id = task_id
        self.workflow_run_id = workflow_run_id
        self.terminal = False
        self.text = ""  # the answer text streamed so far (a followed run continues it)

    def see(self, event: DifyEvent, app_type: str) -> None:
        self.task_id = self.task_id or event.task_id
        self.workflow_run_id = self.workflow_run_id or event.workflow_run_id
        if isinstance(event, TextDelta):
            self.text += event.text
        elif isinstance(event, TextReplace):
            self.text = event.text
        # the run is over, or waits for a person: nothing left to stop
        if ends_answer_stream(event, app_type):
            self.terminal = True


class GuardedAnswers:
    """The bridge's AnswerSource: a DifyClient's streams, followed up when cut and stopped when abandoned."""

    def __init__(
        self,
        client: DifyClient,
        *,
        poll: PollSchedule = PollSchedule(),
    ):
        self.client = client
        self.poll = poll
        self._stops: set[asyncio.Task[None]] = set()
        self._stopped: set[str] = set()  # task ids already asked to stop (`/stop`): never asked twice

    # the bridge reads and sets these on the app's client
    @property
    def app_type(self) -> str:
        return self.client.app_type

    @property
    def input_variable(self) -> str:
        return self.client.input_variable

    @input_variable.setter
    def input_variable(self, value: str) -> None:
        self.client.input_variable = value

    async def stop(self, task_id: str, user: str) -> None:
        if len(self._stopped) > 1000:  # ids of long-gone tasks; only a moment's worth matters
            self._stopped.clear()
        self._stopped.add(task_id)
        await self.client.stop(task_id, user)

    def __getattr__(self, name: str) -> Any:
        # every other call is the client's own (stop, parameters, uploads, ...)
        if name == "client":
            raise AttributeError(name)
        return getattr(self.client, name)

    async def stream_answer(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str | None = None,
        inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[DifyEvent, None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.client.timeouts.total
        progress = _Progress()
        stream = self.client.stream_answer(
            query=query, user=user, conversation_id=conversation_id, inputs=inputs, files=files
        )
        try:
            try:
                async with contextlib.aclosing(stream):
                    async for event in stream:
                        progress.see(event, self.client.app_type)
                        if self._stopped_without_outputs(event):
                            event = await self._with_recorded_outputs(event)
                        yield event
            except (DifyStreamCut, DifyTimeout) as exc:
                async for event in self._after_a_break(progress, user, deadline, exc):
                    yield event
        except asyncio.CancelledError:
            # the bot gave up on this answer (it is stopping): so should Dify
            await self._stop(progress, user, reason="cancelled")
            raise
        except GeneratorExit:
            # closed by the consumer before the end: stopping cannot be awaited here, so it is scheduled
            if not progress.terminal:
                self._stop_later(progress, user)
            raise

    async def follow_run(self, *, run_id: str, task_id: str, user: str) -> AsyncGenerator[DifyEvent, None]:
        """The rest of a run an earlier process of this bot started and could not finish (it died): followed on
        the run events route, stopped in Dify if it cannot be finished. RunNotFollowable when this Dify cannot
        follow it (then nothing was read, and the question may be asked again)."""
        if not self.client.serves_run_events:
            raise RunNotFollowable(f"Dify {self.client.server_version} has no run events route")
        deadline = asyncio.get_running_loop().time() + self.client.timeouts.total
        progress = _Progress(task_id, run_id)
        try:
            events = follow_run_events(self.client, run_id, user, deadline=deadline)
            async with contextlib.aclosing(events):
                async for event in events:
                    progress.see(event, self.client.app_type)
                    if self._stopped_without_outputs(event):
                        event = await self._with_recorded_outputs(event)
                    yield event
        except (DifyStreamCut, DifyTimeout) as exc:
            async for event in self._after_a_break(progress, user, deadline, exc, events_tried=True):
                yield event
        except asyncio.CancelledError:
            await self._stop(progress, user, reason="cancelled")
            raise
        except GeneratorExit:
            if not progress.terminal:
                self._stop_later(progress, user)
            raise

    async def resume_with(
        self, *, run_id: str, task_id: str, user: str, submit: Callable[[], Awaitable[None]]
    ) -> AsyncGenerator[DifyEvent, None]:
        """Resume a paused run by `submit` (a form's answer) and yield what it does next. Its events route is
        subscribed to first: Dify publishes a run's events and keeps none, so the resumed run could otherwise
        start unseen. RunNotFollowable, before anything is submitted, when this Dify cannot be followed; what
        `submit` raises as it raises it."""
        deadline = asyncio.get_running_loop().time() + self.client.timeouts.total
        progress = _Progress(task_id, run_id)
        submitted = False
        try:
            try:
                async with self.client.subscribed_run_events(run_id, user, deadline=deadline) as events:
                    await submit()
                    submitted = True
                    async for event in events:
                        progress.see(event, self.client.app_type)
                        if self._stopped_without_outputs(event):
                            event = await self._with_recorded_outputs(event)
                        yield event
            except DifyAuthError:
                raise
            except (DifyStreamCut, DifyTimeout) as exc:
                if not submitted:
                    raise
                async for event in self._after_a_break(progress, user, deadline, exc, events_tried=True):
                    yield event
            except DifyError as exc:
                if submitted or exc.status not in UNAVAILABLE_STATUSES or isinstance(exc, FormAnswerRefused):
                    raise
                raise RunNotFollowable(str(exc), status=exc.status, code=exc.code) from exc
        except asyncio.CancelledError:
            if submitted:
                await self._stop(progress, user, reason="cancelled")
            raise
        except GeneratorExit:
            if submitted and not progress.terminal:
                self._stop_later(progress, user)
            raise

    async def run_result(self, *, run_id: str, task_id: str, user: str) -> AsyncGenerator[DifyEvent, None]:
        """A workflow run's end from its record, polled (for a Dify whose events route cannot be used)."""
        deadline = asyncio.get_running_loop().time() + self.client.timeouts.total
        cause = DifyStreamCut(f"run {run_id} could not be followed on its events route")
        async for event in self._follow_run(_Progress(task_id, run_id), user, deadline, cause):
            yield event

    # --- after the stream broke --------------------------------------------------------------------------

    async def _after_a_break(
        self, progress: _Progress, user: str, deadline: float, cause: DifyError, *, events_tried: bool = False
    ) -> AsyncGenerator[DifyEvent, None]:
        """Follow the run on its events route when Dify has one, else poll a workflow's run record; stop in Dify
        what cannot be followed, and raise `cause`."""
        followable = bool(progress.workflow_run_id) and not isinstance(cause, DifyTotalTimeout)
        if followable and not events_tried and self.client.serves_run_events:
            log.warning(
                "the stream of run %s ended early (%s); following the run on its events route",
                progress.workflow_run_id, type(cause).__name__,
            )  # fmt: skip
            try:
                events = follow_run_events(
                    self.client, progress.workflow_run_id, user, deadline=deadline, text_so_far=progress.text
                )
                async with contextlib.aclosing(events):
                    async for event in events:
                        progress.see(event, self.client.app_type)
                        if self._stopped_without_outputs(event):
                            event = await self._with_recorded_outputs(event)
                        yield event
                return
            except RunNotFollowable:
                pass  # an older Dify, or a proxy that does not pass the route on: as before
            except (DifyStreamCut, DifyTimeout) as exc:
                log.warning("following run %s broke too (%s)", progress.workflow_run_id, type(exc).__name__)
                cause = exc
        if not self._can_follow(progress, cause):
            await self._stop(progress, user, reason=type(cause).__name__)
            raise cause
        log.warning(
            "the stream of workflow run %s ended early (%s); following the run until it finishes",
            progress.workflow_run_id, type(cause).__name__,
        )  # fmt: skip
        async for event in self._follow_run(progress, user, deadline, cause):
            yield event

    # --- a workflow that ended stopped -------------------------------------------------------------------

    def _stopped_without_outputs(self, event: DifyEvent) -> TypeGuard[WorkflowFinished]:
        return (
            isinstance(event, WorkflowFinished)
            and event.status == "stopped"
            and not event.outputs
            and self.client.app_type == "workflow"
            and bool(event.workflow_run_id)
            and event.task_id not in self._stopped
        )

    async def _with_recorded_outputs(self, event: WorkflowFinished) -> WorkflowFinished:
        """The stopped run's outputs from its record, when it has some (its End node ran); else `event`."""
        try:
            async with asyncio.timeout(self.client.timeouts.first_byte):
                record = await self.client.workflow_run(event.workflow_run_id)
        except (DifyError, TimeoutError) as exc:
            log.info("workflow run %s: its record could not be read (%s)", event.workflow_run_id, type(exc).__name__)
            return event
        outputs = run_outputs(record)
        if not outputs:
            return event
        log.info("workflow run %s ended stopped, but its record has the outputs: answering", event.workflow_run_id)
        return dataclasses.replace(event, outputs=outputs, error=str(record.get("error") or event.error))

    # --- following a workflow run ------------------------------------------------------------------------

    def _can_follow(self, progress: _Progress, exc: DifyError) -> bool:
        return (
            self.client.app_type == "workflow"
            and bool(progress.workflow_run_id)
            and not isinstance(exc, DifyTotalTimeout)  # the time allowed is spent: nothing left to wait with
        )

    async def _follow_run(
        self, progress: _Progress, user: str, deadline: float, cause: DifyError
    ) -> AsyncGenerator[DifyEvent, None]:
        """Poll the run record until the run ends or the deadline passes; yield the end of the answer."""
        loop = asyncio.get_running_loop()
        run_id = progress.workflow_run_id
        record: dict[str, Any] = {}
        delays = self.poll.delays()
        while True:
            try:
                record = await self.client.workflow_run(run_id)
            except DifyAuthError:
                raise
            except DifyError as exc:
                if exc.status == 404:
                    log.warning("workflow run %s is unknown to Dify; giving the answer up", run_id)
                    raise cause from exc
                log.info("reading workflow run %s failed (%s); trying again", run_id, type(exc).__name__)
                record = {}
            status = str(record.get("status") or "")
            if status in ENDED_STATUSES:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self._stop(progress, user, reason="total timeout while following the run")
                raise DifyTotalTimeout(
                    f"workflow run {run_id} was still {status or 'unreadable'} after "
                    f"{self.client.timeouts.total:g} s in total"
                ) from cause
            await asyncio.sleep(min(next(delays), remaining))
        log.info("workflow run %s ended %s after its stream was cut", run_id, status)
        outputs = run_outputs(record)
        # (1.16.1 records a resumed workflow as stopped, with the outputs of its End node: an answer all the same)
        if status not in FINISHED_STATUSES and not (status == "stopped" and text_from_outputs(outputs)):
            error = str(record.get("error") or f"the workflow run {status}")
            raise DifyError(error, code="workflow_failed" if status == "failed" else "workflow_stopped")
        text = text_from_outputs(outputs)
        if text:
            yield TextReplace(
                event="text_replace", task_id=progress.task_id, workflow_run_id=run_id, text=text, moderated=False
            )
        yield WorkflowFinished(
            event="workflow_finished",
            task_id=progress.task_id,
            workflow_run_id=run_id,
            status=status,
            outputs=outputs,
            error=str(record.get("error") or "") if status == "stopped" else "",
        )

    # --- stopping ----------------------------------------------------------------------------------------

    async def _stop(self, progress: _Progress, user: str, *, reason: str) -> None:
        """Ask Dify to stop the task, within STOP_BOUND; failing to is logged and otherwise ignored."""
        if not progress.task_id or progress.terminal or progress.task_id in self._stopped:
            return
        try:
            async with asyncio.timeout(STOP_BOUND):
                await self.stop(progress.task_id, user)
            log.info("stopped Dify task %s (%s)", progress.task_id, reason)
        except (DifyError, TimeoutError) as exc:
            log.warning("could not stop Dify task %s (%s): %s", progress.task_id, reason, type(exc).__name__)

    def _stop_later(self, progress: _Progress, user: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._stop(progress, user, reason="abandoned"))
        except RuntimeError:  # no loop any more (interpreter shutdown): nothing to be done
            return
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)
