"""The pending human-input forms of one bot: kept in the store per chat and person, read again from Dify when a
run pauses, and answered through Dify's form route. The rules of showing and reading them are bridge/forms.py;
the bridge service decides when (bridge/service.py).

A form belongs to the person whose question paused the run, in the chat they asked in: one pending form per
person and chat (a newer pause replaces it), kept across restarts and hosts (the store), forgotten a day after it
expired (so that a late answer is still told it expired).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dingdifyd.bridge.forms import PendingForm
from dingdifyd.dify.forms import HumanInputForm, with_resolved
from dingdifyd.errors import DifyAuthError, DifyError, FormAnswerRefused, PeerError
from dingdifyd.models import IncomingMessage
from dingdifyd.store.base import Store

if TYPE_CHECKING:
    from dingdifyd.bridge.apps import DifyApp

log = logging.getLogger(__name__)

FORM_READ_TIMEOUT = 5.0  # reading a paused run's form again must not hold its card up for long


class FormDesk:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store = store
        self.clock = clock  # wall clock: Dify's expiration times are unix seconds

    @staticmethod
    def chat_key(app: DifyApp, message: IncomingMessage) -> str:
        return f"{app.namespace}|{message.conversation_id}"

    def pending(self, app: DifyApp, message: IncomingMessage) -> tuple[PendingForm | None, list[PendingForm]]:
        """The sender's pending form in this chat, and the other people's."""
        mine: PendingForm | None = None
        others: list[PendingForm] = []
        key = self.chat_key(app, message)
        for person, record in self.store.forms_in_chat(key).items():
            pending = PendingForm.from_dict(record)
            if pending is None:
                log.warning("dropping an unreadable pending form in chat %s", message.conversation_id)
                self.store.forget_form(key, person)
            elif person == message.user_id:
                mine = pending
            else:
                others.append(pending)
        return mine, others

    def keep(self, app: DifyApp, message: IncomingMessage, pending: PendingForm) -> None:
        self.store.save_form(self.chat_key(app, message), message.user_id, pending.to_dict(), pending.forget_at())

    def forget(self, app: DifyApp, message: IncomingMessage) -> None:
        self.store.forget_form(self.chat_key(app, message), message.user_id)

    async def resolved(self, app: DifyApp, form: HumanInputForm) -> HumanInputForm | FormAnswerRefused:
        """The form as Dify resolves it now (`GET /form/human_input/:token`: select options from variables,
        defaults); the form as the event gave it when that cannot be read; the refusal when it is already
        expired or answered."""
        if form.token is None:
            return form
        try:
            async with asyncio.timeout(FORM_READ_TIMEOUT):
                definition = await app.client.form(form.token)
        except DifyError as exc:
            refused = refusal_of(exc)
            if refused is not None and refused.kind in ("expired", "submitted"):
                return refused
            log.info("the form of node %s could not be read again (%s); showing it as paused", form.node_id,
                     type(exc).__name__)  # fmt: skip
            return form
        except (TimeoutError, PeerError, AttributeError):
            return form
        return with_resolved(form, definition)

    def submitter(
        self, app: DifyApp, pending: PendingForm, action_id: str, inputs: dict[str, Any]
    ) -> Callable[[], Awaitable[None]]:
        """The call that answers the form (as the run's own Dify user); Dify's refusals as FormAnswerRefused."""
        token = pending.form.token
        assert token is not None

        async def submit() -> None:
            try:
                await app.client.submit_form(token, action=action_id, inputs=inputs, user=pending.dify_user)
            except DifyAuthError:
                raise
            except DifyError as exc:
                refused = refusal_of(exc)
                if refused is None:
                    raise
                raise refused from exc
            log.info("answered form %s of run %s with action %s", pending.form.form_id, pending.workflow_run_id,
                     action_id)  # fmt: skip

        return submit


def refusal_of(exc: DifyError) -> FormAnswerRefused | None:
    """Dify's refusal of a form answer, by kind: already answered, expired, gone, or not valid (with why)."""
    if exc.status == 412 and exc.code == "human_input_form_submitted":
        return FormAnswerRefused("submitted", str(exc), status=412, code=exc.code)
    if exc.status == 412 and exc.code == "human_input_form_expired":
        return FormAnswerRefused("expired", str(exc), status=412, code=exc.code)
    if exc.status == 404:
        return FormAnswerRefused("gone", str(exc), status=404, code=exc.code)
    if exc.status == 400 and exc.code == "invalid_form_data":
        return FormAnswerRefused("invalid", str(exc), status=400, code=exc.code)
    return None
