"""A message that answers a human-input form waiting in its chat: read as the form's answer (an action, its
fields, the files a file field waits for), submitted to Dify, and the resumed run streamed into the message's card;
or the person told why the answer was not taken. Part of the bridge service (bridge/service.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from dingdifyd.bridge import attachments as att
from dingdifyd.bridge import forms
from dingdifyd.bridge.apps import DifyApp
from dingdifyd.bridge.forms import Answer, Invalid, NotAnAnswer, PendingForm
from dingdifyd.bridge.run_reading import ANSWERED, Done, RunReading
from dingdifyd.bridge.running import AnswerTurn
from dingdifyd.bridge.streamer import CardStreamer
from dingdifyd.bridge.uploads import IncomingFiles
from dingdifyd.errors import FormAnswerRefused, RunNotFollowable
from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)


class FormReplies(RunReading):
    """The part of BridgeService that takes a message as a form's answer."""

    incoming: IncomingFiles

    async def _reply_to_forms(
        self,
        message: IncomingMessage,
        streamer: CardStreamer,
        app: DifyApp,
        key: str,
        text: str,
        mine: PendingForm | None,
        others: list[PendingForm],
    ) -> Done | None:
        """Answer the sender's pending form when the message is its answer; None when it is a new question."""
        if mine is None:
            for other in others if message.is_group else ():
                if forms.choose_action(other.form.actions, text) is not None:
                    asker = other.asker_name or forms.UNNAMED_ASKER
                    await streamer.finish(forms.ONLY_ASKER.format(asker=asker, title=other.title))
                    return ANSWERED
            return None
        if mine.action_id and att.attachments_of(message):  # the file an answer waits for
            return await self._form_files(message, streamer, app, key, mine)
        if not text:
            return None
        reply = forms.read_reply(mine.form, text)
        if isinstance(reply, NotAnAnswer):
            return None
        if isinstance(reply, Invalid):
            await streamer.finish(forms.ANSWER_INVALID.format(reason=reply.reason, title=mine.title))
            return ANSWERED
        return await self._answer_or_wait(message, streamer, app, key, mine, reply)

    async def _answer_or_wait(
        self, message: IncomingMessage, streamer: CardStreamer, app: DifyApp, key: str, pending: PendingForm,
        reply: Answer,
    ) -> Done:  # fmt: skip
        """Submit the answer, or keep it until the files its file fields wait for are sent."""
        if reply.awaiting:
            waiting = dataclasses.replace(pending, action_id=reply.action_id, inputs=dict(reply.inputs))
            self.forms.keep(app, message, waiting)
            await streamer.finish(forms.ANSWER_SEND_FILE.format(name=reply.awaiting[0].name, title=pending.title))
            return ANSWERED
        return await self._answer_form(message, streamer, app, key, pending, reply.action_id, dict(reply.inputs))

    async def _form_files(
        self, message: IncomingMessage, streamer: CardStreamer, app: DifyApp, key: str, pending: PendingForm
    ) -> Done:
        """A picture or file sent for the first file field an answer waits for."""
        field = next(f for f in pending.form.fields if f.is_file and f.name not in pending.inputs)
        refused = next((a for a in att.attachments_of(message)
                        if not forms.accepts(field, a.dify_type, a.extension)), None)  # fmt: skip
        if refused is not None:
            wrong = forms.ANSWER_FILE_WRONG.format(name=field.name, kinds=forms.kinds_of(field), title=pending.title)
            await streamer.finish(wrong)
            return ANSWERED
        limit = 1 if field.type == "file" else field.max_files or 10
        uploaded = await self.incoming.upload_for_form(message, user=pending.dify_user, app=app, limit=limit)
        if isinstance(uploaded, str):
            await streamer.finish(forms.ANSWER_INVALID.format(reason=uploaded, title=pending.title))
            return ANSWERED
        value: Any = uploaded[0] if field.type == "file" else uploaded
        reply = forms.answer(pending.form, pending.action_id, {**pending.inputs, field.name: value})
        if isinstance(reply, Invalid):  # (cannot be: the rest was checked when the action was chosen)
            await streamer.finish(forms.ANSWER_INVALID.format(reason=reply.reason, title=pending.title))
            return ANSWERED
        return await self._answer_or_wait(message, streamer, app, key, pending, reply)

    async def _answer_form(
        self, message: IncomingMessage, streamer: CardStreamer, app: DifyApp, key: str, pending: PendingForm,
        action_id: str, inputs: dict[str, Any],
    ) -> Done:  # fmt: skip
        """Answer the form in Dify and stream what the run does next into this message's card."""
        submit_form = self.forms.submitter(app, pending, action_id, inputs)

        async def submit() -> None:
            await submit_form()
            self.forms.forget(app, message)  # answered: whatever happens next, it is no longer pending

        show = streamer.set_text if self.bot.presentation.show_progress else None
        turn = AnswerTurn(app=app, session_key=key, user=pending.dify_user, show=show)
        if pending.conversation_id and self.store.get_conversation(key) != pending.conversation_id:
            turn.detached = True  # the session moved on (/new, a newer conversation): do not bring this one back
        rich = self._rich(message, app)
        streamer.render_with(rich.view)
        resume = getattr(app.answers, "resume_with", None)
        try:
            with self.running.track(turn):
                try:
                    if resume is None:
                        raise RunNotFollowable("these answers cannot follow a run")
                    stream = resume(run_id=pending.workflow_run_id, task_id=pending.task_id, user=pending.dify_user,
                                    submit=submit)  # fmt: skip
                    transcript = await self._follow(stream, pending.conversation_id or None, streamer, turn, rich)
                except RunNotFollowable:
                    # this Dify cannot show the resumed run: answer all the same, and read a workflow's end
                    await submit()
                    run_result = getattr(app.answers, "run_result", None)
                    if app.client.app_type != "workflow" or run_result is None:
                        await streamer.finish(forms.ANSWER_NOT_PASSED.format(title=pending.title))
                        return ANSWERED
                    stream = run_result(run_id=pending.workflow_run_id, task_id=pending.task_id,
                                        user=pending.dify_user)  # fmt: skip
                    transcript = await self._follow(stream, None, streamer, turn, rich)
            return await self._end_card(message, streamer, turn, rich, transcript, [])
        except FormAnswerRefused as refused:
            log.info("message %s: the form answer was refused (%s)", message.msg_id, refused.kind)
            await streamer.finish(self._refused_text(app, message, pending, refused))
            return ANSWERED
        finally:
            await rich.aclose()

    def _refused_text(
        self, app: DifyApp, message: IncomingMessage, pending: PendingForm, refused: FormAnswerRefused
    ) -> str:
        title = pending.title
        if refused.kind == "invalid":  # the form stays: the person may answer again
            return forms.ANSWER_REFUSED.format(title=title, reason=str(refused))
        self.forms.forget(app, message)
        if refused.kind == "expired":
            return forms.ANSWER_EXPIRED.format(title=title)
        if refused.kind == "submitted":
            return forms.ANSWER_TOO_LATE.format(title=title)
        return forms.ANSWER_GONE.format(title=title)
