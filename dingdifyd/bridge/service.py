"""The bridge: one incoming message in, one streamed answer out, exactly once, and never silence.

Per message (docs/design.md#per-message): claim it durably (a redelivery is dropped), handle chat commands, find
the Dify conversation of its session, stream the answer into a card, remember the conversation, and on any
failure end the card with a short readable message while the log gets the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from dingdifyd.bridge import forms, intake, session
from dingdifyd.bridge.access import AccessPolicy
from dingdifyd.bridge.apps import AppRouter
from dingdifyd.bridge.commands import ChatCommands, parse_command
from dingdifyd.bridge.failures import failure_note
from dingdifyd.bridge.form_replies import FormReplies
from dingdifyd.bridge.human_input import FormDesk
from dingdifyd.bridge.ledger import AnswerLedger
from dingdifyd.bridge.markdown import for_plain_reply
from dingdifyd.bridge.media import MediaTransfers, send_after_card
from dingdifyd.bridge.ports import MessageFiles, ReplyChannel
from dingdifyd.bridge.recent import RecentIds
from dingdifyd.bridge.report import AnswerReport
from dingdifyd.bridge.run_reading import ANSWERED, Done, with_note
from dingdifyd.bridge.running import AnswerTurn, RunningAnswers
from dingdifyd.bridge.streamer import CardStreamer
from dingdifyd.bridge.uploads import IncomingFiles
from dingdifyd.config import BotConfig
from dingdifyd.errors import (
    PeerError,
    StoreUnavailable,
)
from dingdifyd.logs.fields import event as log_event
from dingdifyd.logs.fields import message_context
from dingdifyd.models import IncomingMessage
from dingdifyd.pacing.coalesce import UpdatePolicy
from dingdifyd.pacing.scheduler import CardScheduler
from dingdifyd.store.base import InFlight, Store

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # an answer whose process died this many times is given up, visibly

INTERNAL_ERROR = "Something went wrong on our side while answering. Please try again."
INTERRUPTED = "The bot is restarting and could not finish this answer. Please ask again in a moment."
GAVE_UP = "This message could not be answered (the bot stopped several times while answering it)."
CANNOT_TAKE_MESSAGES = (
    "Sorry, I cannot take messages right now: the bot's server has a problem (its admin can see it in the "
    "log). Please send your message again in a few minutes."
)

# A store that cannot write is an outage once it has lasted this long: people whose messages it refuses are
# told (once per message), instead of waiting for DingTalk's redeliveries in silence.
STORE_OUTAGE_NOTICE_AFTER = 60.0


class Intake(enum.Enum):
    """What became of a delivered message, and so whether its frame is ACKed."""

    TAKEN = "taken"  # answered (or refused with a reply) here
    DUPLICATE = "duplicate"  # already claimed: a redelivery
    IGNORED = "ignored"  # nothing to answer, or the bot is stopping
    NOT_TAKEN = "not taken"  # the store could not claim it: not ACKed, so that DingTalk delivers it again

    @property
    def ack(self) -> bool:
        return self is not Intake.NOT_TAKEN


class BridgeService(FormReplies):
    """One bot's messages in, their answers out: what the bot process (worker/) and the terminal chat drive. Asking
    Dify and following its runs is in bridge/run_reading.py, a form's answer in bridge/form_replies.py."""

    def __init__(
        self,
        *,
        bot: BotConfig,
        store: Store,
        apps: AppRouter,
        replies: ReplyChannel,
        clock: Callable[[], float] = time.monotonic,
        files: MessageFiles | None = None,
        scheduler: CardScheduler | None = None,
        interrupted_note: str = INTERRUPTED,
        on_answer: Callable[[AnswerReport], None] | None = None,
        store_outage_notice_after: float = STORE_OUTAGE_NOTICE_AFTER,
    ):
        self.bot = bot
        # what an answer cut short by a stop says (the terminal chat's Ctrl-C restarts nothing)
        self.interrupted_note = interrupted_note
        self.on_answer = on_answer  # how each message's handling ended: the bot's status and metrics
        # the app's card-call scheduler, shared by every answer (None: each card unpaced, as in the terminal)
        self.scheduler = scheduler
        self.store = store
        self.ledger = AnswerLedger(store)  # answers in flight: claimed, updated, ended, replayed when refused
        self.store_outage_notice_after = store_outage_notice_after
        self._store_failing_since: float | None = None
        self._told_not_taken = RecentIds(1000)  # messages whose sender was told the bot cannot take them
        self._not_taken_keys = RecentIds(10000)  # messages not ACKed here: DingTalk delivers them again, late
        # pictures and files both ways (DingTalk's side; without it, e.g. in the terminal chat, text only)
        self.files = files
        self.incoming = IncomingFiles(bot=bot, chat=files)
        self.media_transfers = MediaTransfers()  # Dify's images and files on their way: a few at a time
        # which Dify app answers a message: the bot's own, or a route's (`routes:`)
        self.apps = apps
        self.access = AccessPolicy.from_bot(bot)
        self.running = RunningAnswers()
        self.commands = ChatCommands(bot.conversation.command_prefix, store, self.running)
        self.forms = FormDesk(store)  # human-input forms waiting for people's answers
        self.replies = replies
        self.clock = clock
        self.policy = UpdatePolicy(interval=bot.cards.update_interval, min_chars=bot.cards.update_min_chars)
        self._tasks: set[asyncio.Task[None]] = set()
        self._streamers: dict[str, CardStreamer] = {}  # message key -> the card of its answer in flight
        self._answer_tasks: dict[str, asyncio.Task[None]] = {}
        self._handed_over: set[str] = set()  # answers abandoned to another process: no more writes about them
        self._accepting = True
        self._recovery_due = False  # the store could not list the answers left unfinished; ask again later
        self.answered = 0
        self.failed = 0
        self.redeliveries = 0  # messages recognised as already claimed (here, by an earlier process, or a peer)
        self.handovers = 0  # answers left to other processes when this one's lease could not be renewed

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # --- entry points ------------------------------------------------------------------------------------

    def submit(self, message: IncomingMessage) -> Intake:
        """Take a delivered message. Synchronous and quick: it runs before the frame is ACKed, and its frame is
        ACKed only when the result says so (a message the store could not claim is delivered again)."""
        key = session.message_key(message)
        if not self._accepting:
            log.warning("message %s arrived while stopping; not taken", message.msg_id)
            return Intake.IGNORED
        if not intake.answerable(message):
            log.warning("message %s has no sender or conversation to answer; ignored", message.msg_id)
            return Intake.IGNORED
        refusal = self.access.refusal(message)
        record = None
        if refusal is None:
            record = InFlight(key, dataclasses.asdict(message), session.out_track_id(message), attempts=1)
        try:
            claimed = self.ledger.claim(key, record)  # the claim and its answer in flight: one transaction
        except StoreUnavailable:
            self._not_taken(message)
            return Intake.NOT_TAKEN
        self._store_failing_since = None
        about = {"msg_id": message.msg_id, "conversation_id": message.conversation_id}
        if not claimed:
            self.redeliveries += 1
            log.info("message %s is a redelivery; already answered or being answered", message.msg_id,
                     extra=log_event("duplicate", **about))  # fmt: skip
            return Intake.DUPLICATE
        if refusal is not None or record is None:
            log.info("message %s from %s refused (%s)", message.msg_id, message.user_id, refusal,
                     extra=log_event("refused", **about))  # fmt: skip
            self._report(AnswerReport("refused"))
            self._refuse(message)
            return Intake.TAKEN
        log.info(
            "message %s from %s in %s chat %s (%s, %d chars)",
            message.msg_id, message.user_id, "group" if message.is_group else "1:1",
            message.conversation_id, message.msg_type, len(message.text), extra=log_event("received", **about),
        )  # fmt: skip
        self._spawn(message, record, resumed=False)
        return Intake.TAKEN

    def not_taken_before(self, message: IncomingMessage) -> bool:
        """Whether this process left the message unACKed before: its redelivery is late by our doing."""
        return session.message_key(message) in self._not_taken_keys

    def _not_taken(self, message: IncomingMessage) -> None:
        """The store could not claim the message (the store logs the outage, once): it is not ACKed. Once the
        outage has lasted, its sender is told, once per message, not left waiting in silence."""
        self._not_taken_keys.add(session.message_key(message))
        now = self.clock()
        if self._store_failing_since is None:
            self._store_failing_since = now
        log.info("message %s not taken: the store cannot claim it; DingTalk will deliver it again", message.msg_id)
        if now - self._store_failing_since < self.store_outage_notice_after or not self._told_not_taken.add(
            session.message_key(message)
        ):
            return

        async def tell() -> None:
            try:
                await self.replies.plain_reply(message, CANNOT_TAKE_MESSAGES)
            except PeerError as exc:
                log.warning("message %s: the person could not be told (%s)", message.msg_id, type(exc).__name__)

        task = asyncio.create_task(tell(), name=f"not-taken-{message.msg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def recover(self) -> int:
        """Finish the answers an earlier process of this bot started and did not end (it crashed or was killed):
        only what is unfinished, so an answer whose card is final only gets what it had still to send."""
        try:
            records = self.store.unfinished_answers()
        except StoreUnavailable:
            self._recovery_due = True  # looked at again once the store works (see retry_recovery)
            return 0
        self._recovery_due = False
        resumed = 0
        for record in records:
            if record.message_key in self._answer_tasks:
                continue  # still being answered (or handed over and still stopping) here
            try:
                message = IncomingMessage(**record.message)
            except TypeError:
                self.ledger.end(record.message_key)
                continue
            if record.final_delivered:
                log.warning("message %s: an earlier process delivered its answer; sending what it had left (%d)",
                            message.msg_id, len(record.pending_sends))  # fmt: skip
                self._spawn_task(self._finish_sends(message, record), f"sends-{message.msg_id}")
                resumed += 1
                continue
            record = dataclasses.replace(record, attempts=record.attempts + 1)
            self.ledger.save(record)
            log.warning(
                "resuming message %s left unanswered by an earlier process (attempt %d)",
                message.msg_id,
                record.attempts,
            )
            self._spawn(message, record, resumed=True)
            resumed += 1
        return resumed

    def retry_recovery(self) -> int:
        """`recover` again if the store could not be read when it last tried."""
        return self.recover() if self._recovery_due else 0

    def hand_over(self) -> int:
        """This process can no longer prove it is alive to the others sharing the store (its lease could not
        be renewed in time): stop writing every card whose answer the store holds, at once and without a word,
        since another process will adopt and finish it. Answers the store never learnt of go on here."""
        handed = 0
        for key, streamer in list(self._streamers.items()):
            if not self.ledger.in_store(key):
                continue
            self._handed_over.add(key)
            self.ledger.forget(key)
            streamer.abandon()
            handed += 1
            task = self._answer_tasks.get(key)
            if task is not None:
                task.cancel()
        self.handovers += handed
        return handed

    async def wait_idle(self) -> None:
        """Wait until every answer in flight has ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def drain(self, timeout: float) -> None:
        """Graceful stop: take nothing new, let answers finish within `timeout`, end the rest visibly."""
        self._accepting = False
        if self._tasks:
            log.info("waiting up to %.0fs for %d answers in flight", timeout, len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)

    # --- one message --------------------------------------------------------------------------------------

    def _spawn(self, message: IncomingMessage, record: InFlight, *, resumed: bool) -> None:
        key = record.message_key
        task = self._spawn_task(
            self._answer(message, record, resumed), f"answer-{message.msg_id}",
            context=message_context(message.msg_id, message.conversation_id),  # its log lines name the message
        )  # fmt: skip
        self._answer_tasks[key] = task

        def ended(_: asyncio.Task[None]) -> None:
            self._answer_tasks.pop(key, None)
            # an answer handed over may come back to this process like any other's (recover adopts it)
            self._handed_over.discard(key)

        task.add_done_callback(ended)

    def _spawn_task(
        self, coroutine: Coroutine[Any, Any, None], name: str, context: contextvars.Context | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine, name=name, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _answer(self, message: IncomingMessage, record: InFlight, resumed: bool) -> None:
        started = self.clock()
        key = record.message_key
        card = self.replies.card(message, record.out_track_id)

        async def plain(text: str) -> None:
            await self.replies.plain_reply(message, for_plain_reply(text))

        streamer = CardStreamer(card, self.policy, plain, self.clock, scheduler=self.scheduler)
        self._streamers[key] = streamer
        outcome = "failed"
        sends: tuple[dict[str, str], ...] = ()
        error: BaseException | None = None
        try:
            await streamer.open(already_exists_ok=resumed)
            if record.attempts > MAX_ATTEMPTS:
                await streamer.fail(GAVE_UP)
                return
            outcome, sends = await self._respond(message, streamer, record)
        except asyncio.CancelledError:
            outcome = "interrupted"
            if key not in self._handed_over:
                with contextlib.suppress(BaseException):
                    ending = streamer.fail(with_note(streamer.text, self.interrupted_note))
                    await asyncio.wait_for(asyncio.shield(ending), 10)
            raise
        except PeerError as exc:
            error = exc
            log.warning("message %s: %s", message.msg_id, exc.brief())
            await streamer.fail(with_note(streamer.text, failure_note(exc)))
        except Exception as exc:
            error = exc
            log.exception("message %s: unexpected error", message.msg_id)
            await streamer.fail(with_note(streamer.text, INTERNAL_ERROR))
        finally:
            self._streamers.pop(key, None)
            if key in self._handed_over:
                outcome = "handed over to another process"
            else:
                if outcome == "answered":
                    self.answered += 1
                else:
                    self.failed += 1
                if streamer.delivered_by is not None:
                    # the person has the final answer (or the note why not): from here on a successor must
                    # only send what is left, never ask Dify again
                    record = dataclasses.replace(record, final_delivered=True, pending_sends=tuple(sends))
                    self.ledger.save(record)
                if not record.pending_sends:
                    self.ledger.end(key)
            log.info(
                "message %s %s in %.2fs (%d card calls, %d chars%s)",
                message.msg_id,
                outcome,
                self.clock() - started,
                streamer.calls,
                len(streamer.text),
                ", sent as a plain reply" if streamer.delivered_by == "reply" else "",
                extra=log_event(outcome),
            )
            shown = streamer.first_shown_at
            command = parse_command(message.text, self.bot.conversation.command_prefix)
            self._report(AnswerReport(
                outcome, self.clock() - started, shown - started if shown is not None else None, error,
                dify_answered=outcome == "answered" and (command is None or command.name not in ChatCommands.KNOWN),
            ))  # fmt: skip
        if record.pending_sends and key not in self._handed_over:
            await self._finish_sends(message, record)

    async def _finish_sends(self, message: IncomingMessage, record: InFlight) -> None:
        """Send what follows the card (images, files), recording each as sent; then the answer is done."""
        if self.files is not None:

            async def plain(text: str) -> None:
                await self.replies.plain_reply(message, for_plain_reply(text))

            remaining = list(record.pending_sends)
            while remaining:
                await send_after_card(self.files, message, remaining[0], plain)
                remaining.pop(0)
                if remaining:
                    self.ledger.save(dataclasses.replace(record, pending_sends=tuple(remaining)))
        self.ledger.end(record.message_key)

    def _report(self, report: AnswerReport) -> None:
        if self.on_answer is not None:
            try:
                self.on_answer(report)
            except Exception:  # the figures must never cost an answer
                log.exception("reporting an answer failed")

    def _refuse(self, message: IncomingMessage) -> None:
        """A refused person gets the polite reply through the sessionWebhook: no card, no API quota used."""
        if not self.bot.access.denied_reply:
            return

        async def reply() -> None:
            try:
                await self.replies.plain_reply(message, self.bot.access.denied_reply)
            except PeerError as exc:
                log.warning("message %s: the refusal could not be sent (%s)", message.msg_id, type(exc).__name__)

        task = asyncio.create_task(reply(), name=f"refuse-{message.msg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respond(self, message: IncomingMessage, streamer: CardStreamer, record: InFlight) -> Done:
        # DingTalk errors, huge texts
        refusal = intake.refusal(message, max_chars=self.bot.conversation.max_message_chars)
        if refusal is not None:
            await streamer.finish(refusal)
            return ANSWERED
        text = message.text.strip()
        app = self.apps.route_for(message)
        key = app.session_key(message, self.bot.conversation.session_scope)
        reply = await self.commands.handle(text, key)  # None: not a command of ours (`/summarize` goes to Dify)
        if reply is not None:
            await streamer.finish(reply)
            return ANSWERED
        user = session.dify_user(message, self.bot.conversation.session_scope)
        if record.workflow_run_id:
            # an earlier process died while Dify answered: follow that run rather than ask again
            followed = await self._follow_run_of(message, streamer, record, app, key, user)
            if followed is not None:
                return followed
        # a human-input form waiting for this person (or someone else) in this chat: is this its answer?
        mine, others = self.forms.pending(app, message)
        if mine is not None or others:
            answered = await self._reply_to_forms(message, streamer, app, key, text, mine, others)
            if answered is not None:
                return answered
        hint = None
        if mine is not None:
            if mine.expired(self.forms.clock()):
                self.forms.forget(app, message)  # not an answer, and too late for one anyway
            else:
                hint = forms.STILL_PENDING.format(title=mine.title)
        # pictures, files and voice: what the app is asked, or why it cannot be (bridge/uploads.py)
        question = await self.incoming.prepare(message, text, user=user, app=app)
        if question.reply is not None:
            await streamer.finish(question.reply)
            return ANSWERED
        show = streamer.set_text if self.bot.presentation.show_progress else None
        turn = AnswerTurn(app=app, session_key=key, user=user, show=show)
        rich = self._rich(message, app)
        streamer.render_with(rich.view)
        try:
            with self.running.track(turn):  # what /stop finds
                transcript = await self._ask_dify(message, question, streamer, turn, rich, record)
            return await self._end_card(message, streamer, turn, rich, transcript, question.notes, hint=hint)
        finally:
            await rich.aclose()

