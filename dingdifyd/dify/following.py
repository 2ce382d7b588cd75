"""Following a Dify run on its events route (`GET /workflow/:run_id/events`, Dify ≥ 1.14) after its stream broke,
or after the process that asked died: the rest of the run goes into the same card, without repeating its text.

Dify publishes a run's events to whoever listens and keeps none, so the route is asked with
`include_state_snapshot=true`: the run so far is replayed from Dify's records first (nodes, a pause and its form;
a chatflow's persisted answer as `message_replace`, "" while the run goes on), then the events from now on, up to
`workflow_finished` or `workflow_paused`. A run that already ended gives its `workflow_finished` alone. Text the
stream carried between the break and the subscription is lost on the way, so when the run ends with its answer in
its outputs (a chatflow's `answer`, a workflow's outputs), the whole answer replaces the text pieced together.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from dingdifyd.dify.client import DifyClient
from dingdifyd.dify.events import DifyEvent, TextDelta, TextReplace, WorkflowFinished, text_from_outputs
from dingdifyd.errors import DifyAuthError, DifyError, RunNotFollowable

log = logging.getLogger(__name__)

# statuses of an events route that is not there (0.x, a proxy that does not pass it on) or will not answer
UNAVAILABLE_STATUSES = (400, 404, 405, 501)


async def follow_run_events(
    client: DifyClient, run_id: str, user: str, *, deadline: float, text_so_far: str = ""
) -> AsyncGenerator[DifyEvent, None]:
    """The rest of run `run_id`, as typed events ending with its terminal one. `text_so_far`: the answer text
    already shown, continued by the run's deltas and replaced by its outputs' answer when that differs.

    Raises RunNotFollowable before any event when the route cannot be used; DifyError and its kin as a stream
    does once it has started."""
    text = text_so_far
    started = False
    try:
        async for event in client.run_events(run_id, user, snapshot=True, deadline=deadline):
            started = True
            if isinstance(event, TextReplace) and not event.moderated and not event.text.strip():
                continue  # the snapshot's replay of a chatflow answer not saved yet: not a replacement
            if isinstance(event, TextReplace):
                text = event.text
            elif isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, WorkflowFinished):
                answer = _answer_of(event, client.app_type)
                if answer and answer != text:
                    yield TextReplace(
                        event="text_replace", task_id=event.task_id, workflow_run_id=run_id, text=answer,
                        conversation_id=event.conversation_id, message_id=event.message_id, moderated=False,
                    )  # fmt: skip
            yield event
    except DifyAuthError:
        raise
    except DifyError as exc:
        if started or exc.status not in UNAVAILABLE_STATUSES:
            raise
        log.info("run %s cannot be followed on its events route (HTTP %s %s)", run_id, exc.status, exc.code)
        raise RunNotFollowable(str(exc), status=exc.status, code=exc.code) from exc


def _answer_of(event: WorkflowFinished, app_type: str) -> str:
    """The whole answer a finished run's outputs hold: a chatflow's Answer node output, a workflow's text."""
    if event.status not in ("succeeded", "partial-succeeded"):
        return ""
    if app_type == "workflow":
        return text_from_outputs(event.outputs)
    answer = event.outputs.get("answer")
    return answer if isinstance(answer, str) else ""
