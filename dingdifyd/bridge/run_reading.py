"""Asking Dify and reading its run into the card: the question sent, the events followed as the text grows (with
the place in the queue, the run's files, the conversation remembered), and the card ended the way the run ended:
its answer, what was written with why it stopped, or the form the run waits for. Also the run a process that died
had started, followed to its end. The bridge service (bridge/service.py) is built on this.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from dingdifyd.bridge import forms
from dingdifyd.bridge.apps import DifyApp
from dingdifyd.bridge.forms import PendingForm
from dingdifyd.bridge.human_input import FormDesk
from dingdifyd.bridge.ledger import AnswerLedger
from dingdifyd.bridge.media import MediaTransfers
from dingdifyd.bridge.ports import MessageFiles
from dingdifyd.bridge.progress import with_suggestions
from dingdifyd.bridge.rich import RichAnswer
from dingdifyd.bridge.running import AnswerTurn, RunningAnswers, stopped_text
from dingdifyd.bridge.streamer import CardStreamer
from dingdifyd.bridge.transcript import Ending, Transcript
from dingdifyd.bridge.uploads import Question
from dingdifyd.config import BotConfig
from dingdifyd.dify.events import Admitted, DifyEvent, MessageEnd, MessageFile, Queued, WorkflowFinished
from dingdifyd.errors import ConversationNotFound, DifyStreamCut, FormAnswerRefused, RunNotFollowable
from dingdifyd.models import IncomingMessage
from dingdifyd.store.base import InFlight, Store

log = logging.getLogger(__name__)

EMPTY_ANSWER = "(The app returned an empty answer.)"
QUEUED = "⏳ Queued: {ahead} ahead"  # the answer waits for its turn at the AI service (dify/protected.py)
QUEUE_YOUR_TURN = "⏳ It is your turn; the answer is on its way."


class Done(NamedTuple):
    """How one message's handling ended, and what still follows its card (images, files: media.py)."""

    outcome: str  # answered | failed
    sends: tuple[dict[str, str], ...] = ()


ANSWERED = Done("answered")


class RunReading:
    """The part of BridgeService that talks to Dify about one answer (its state is the service's, set up in
    BridgeService.__init__)."""

    bot: BotConfig
    store: Store
    ledger: AnswerLedger
    files: MessageFiles | None
    media_transfers: MediaTransfers
    running: RunningAnswers
    forms: FormDesk

    async def _pause_card(
        self, message: IncomingMessage, streamer: CardStreamer, turn: AnswerTurn, transcript: Transcript, shown: str
    ) -> Done:
        """A run that waits for a form: the form in the card, kept for the person's answer."""
        form = transcript.forms[0] if transcript.forms else None
        if form is None:
            text = forms.FORM_UNAVAILABLE.format(title=forms.UNTITLED_FORM)
        elif form.token is None:
            text = forms.render_elsewhere(form)  # delivered only where the Service API may not answer it
        else:
            resolved = await self.forms.resolved(turn.app, form)
            if isinstance(resolved, FormAnswerRefused):
                text = forms.FORM_EXPIRED
            else:
                now = self.forms.clock()
                pending = PendingForm(
                    form=resolved, app=turn.app.namespace, workflow_run_id=transcript.run_id, task_id=turn.task_id,
                    dify_user=turn.user, asker=message.user_id, asker_name=message.sender_nick,
                    conversation_id=transcript.conversation_id, created_at=now,
                )  # fmt: skip
                self.forms.keep(turn.app, message, pending)
                log.info("message %s: run %s waits for form %s", message.msg_id, transcript.run_id, form.form_id)
                text = forms.render_form(resolved, now)
        await streamer.finish(f"{shown.rstrip()}\n\n---\n{text}" if shown.strip() else text)
        return ANSWERED

    async def _follow_run_of(
        self, message: IncomingMessage, streamer: CardStreamer, record: InFlight, app: DifyApp, key: str, user: str
    ) -> Done | None:
        """Finish an answer whose process died, from its Dify run; None when this Dify cannot follow it (the
        question is then asked again, as before 1.x)."""
        follow = getattr(app.answers, "follow_run", None)
        if follow is None:
            return None
        turn = AnswerTurn(app=app, session_key=key, user=user)  # no progress lines: the card keeps its text
        rich = self._rich(message, app)
        streamer.render_with(rich.view)
        stream = follow(run_id=record.workflow_run_id, task_id=record.task_id, user=user)
        try:
            with self.running.track(turn):
                # the card keeps what the dead process wrote until the run's end is known: the run's text
                # between then and now is not to be had again
                transcript = await self._follow(stream, None, streamer, turn, rich, quiet=True)
            log.info("message %s: followed Dify run %s to its end", message.msg_id, record.workflow_run_id)
            return await self._end_card(message, streamer, turn, rich, transcript, [])
        except RunNotFollowable as exc:
            log.info("message %s: run %s cannot be followed (%s); asking again", message.msg_id,
                     record.workflow_run_id, exc.status)  # fmt: skip
            return None
        finally:
            await rich.aclose()

    async def _end_card(
        self,
        message: IncomingMessage,
        streamer: CardStreamer,
        turn: AnswerTurn,
        rich: RichAnswer,
        transcript: Transcript,
        notes: list[str],
        *,
        hint: str | None = None,
    ) -> Done:
        """End the card the way the run ended: its answer, what was written with why it stopped, or the form it
        waits for. `hint`: a line after the answer (a form still waiting)."""
        ending = transcript.ending
        shown = await rich.final(transcript.raw)
        if ending is Ending.PAUSED and not turn.stopped:
            return await self._pause_card(message, streamer, turn, transcript, shown)
        if ending is Ending.CUT and not turn.stopped:
            await streamer.fail(with_note(shown, DifyStreamCut.user_message))
            return Done("failed")
        final = await self._final_text(turn, shown, ending) or EMPTY_ANSWER
        final = _with_notes(final, notes)
        await streamer.finish(f"{final}\n\n{hint}" if hint else final)
        return Done("answered", tuple(rich.after_card()))

    def _rich(self, message: IncomingMessage, app: DifyApp) -> RichAnswer:
        """How one answer is shown: rendered, with Dify's images and files brought over (a few at a time)."""
        return RichAnswer(bot=self.bot, message=message, dify=app.client, files=self.files,
                          transfers=self.media_transfers)  # fmt: skip

    async def _final_text(self, turn: AnswerTurn, answer: str, ending: Ending) -> str:
        """The answer as the card ends with it: marked when stopped (by /stop, or in Dify by someone else),
        followed by suggested questions."""
        if turn.stopped or ending is Ending.STOPPED:
            return stopped_text(answer)
        if self.bot.presentation.show_suggested_questions and answer.strip():
            timeout = self.bot.presentation.suggested_questions_timeout
            return with_suggestions(answer, await turn.app.suggested_questions(turn.message_id, turn.user, timeout))
        return answer

    async def _ask_dify(
        self,
        message: IncomingMessage,
        question: Question,
        streamer: CardStreamer,
        turn: AnswerTurn,
        rich: RichAnswer,
        record: InFlight,
    ) -> Transcript:
        conversation_id = self.store.get_conversation(turn.session_key)
        try:
            return await self._stream(message, question, conversation_id, streamer, turn, rich, record)
        except ConversationNotFound:
            if conversation_id is None:
                raise
            # expired or deleted on the Dify side: start afresh, once
            log.info("message %s: conversation expired on the Dify side; starting a new one", message.msg_id)
            self.store.forget_conversation(turn.session_key)
            return await self._stream(message, question, None, streamer, turn, rich, record)

    async def _stream(
        self,
        message: IncomingMessage,
        question: Question,
        conversation_id: str | None,
        streamer: CardStreamer,
        turn: AnswerTurn,
        rich: RichAnswer,
        record: InFlight,
    ) -> Transcript:
        stream = turn.app.answers.stream_answer(
            query=question.query,
            user=turn.user,
            conversation_id=conversation_id,
            inputs={**await turn.app.inputs_for(message), **question.inputs},
            files=question.files or None,
        )

        def remember_run(run_id: str, task_id: str) -> None:
            # a successor of this process follows the run instead of asking again (Dify ≥ 1.14)
            self.ledger.save(dataclasses.replace(record, workflow_run_id=run_id, task_id=task_id))

        return await self._follow(stream, conversation_id, streamer, turn, rich, on_run=remember_run)

    async def _follow(
        self,
        stream: AsyncIterator[DifyEvent],
        conversation_id: str | None,
        streamer: CardStreamer,
        turn: AnswerTurn,
        rich: RichAnswer,
        *,
        quiet: bool = False,
        on_run: Callable[[str, str], None] | None = None,
    ) -> Transcript:
        """Read a run's events into the card: the text as it grows (unless `quiet`), its files, and how it
        ended. `on_run` learns the run's id and task id once the stream names them."""
        transcript = Transcript()
        key = turn.session_key
        remembered = conversation_id
        ttl = self.bot.conversation.ttl
        run_named = False
        queue_shown = False  # the card says the answer waits for its turn (not the answer, nor a failure's)
        try:
            # the turn records the task id (/stop), shows progress until the text starts, ends early when stopped
            async for event in turn.events(stream):
                if event.conversation_id and event.conversation_id != remembered and not turn.detached:
                    # remember at once: even if this answer fails later, the next message continues it
                    self.store.set_conversation(key, event.conversation_id, ttl)
                    remembered = event.conversation_id
                if on_run is not None and not run_named and event.workflow_run_id and event.task_id:
                    run_named = True
                    on_run(event.workflow_run_id, event.task_id)
                if isinstance(event, Queued):
                    # the card shows the place when it changes; the streamer paces the updates like any text
                    streamer.set_text(QUEUED.format(ahead=event.ahead))
                    queue_shown = True
                elif isinstance(event, Admitted):
                    streamer.set_text(QUEUE_YOUR_TURN)
                if isinstance(event, MessageFile | MessageEnd | WorkflowFinished):
                    rich.see(event)  # images and files beside the text
                if transcript.feed(event) and not quiet:
                    streamer.set_text(transcript.raw)
        except BaseException:
            if queue_shown and not transcript.raw:
                streamer.set_text("")  # a failure shows its note alone, not after a place in a queue
            raise
        if remembered and not turn.detached:
            self.store.set_conversation(key, remembered, ttl)  # sliding expiry: every turn restarts the clock
        return transcript


def _with_notes(answer: str, notes: list[str]) -> str:
    """The answer, then what could not be passed on (files the app did not accept)."""
    return "\n\n".join([answer, *(f"⚠️ {note}" for note in notes)]) if notes else answer


def with_note(partial: str, note: str) -> str:
    """Keep what was already answered and say clearly why it stopped."""
    return f"{partial.rstrip()}\n\n---\n⚠️ {note}" if partial.strip() else f"⚠️ {note}"
