"""The bridge: one incoming message in, one streamed answer out, exactly once, and never silence.

Per message (DESIGN.md §2): claim it durably (a redelivery is dropped), handle chat commands, find the Dify
conversation of its session, stream the answer into a card, remember the conversation, and on any failure end
the card with a short readable message while the log gets the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from dingdifyd.bridge import session
from dingdifyd.bridge.coalesce import UpdatePolicy
from dingdifyd.bridge.models import IncomingMessage
from dingdifyd.bridge.ports import AnswerSource, ReplyChannel
from dingdifyd.bridge.streamer import CardStreamer
from dingdifyd.config import BotConfig
from dingdifyd.dify.events import MessageEnd, TextDelta, TextReplace, WorkflowFinished, text_from_outputs
from dingdifyd.errors import ConversationNotFound, PeerError
from dingdifyd.store import InFlight, Store

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # an answer whose process died this many times is given up, visibly

EMPTY_ANSWER = "(The app returned an empty answer.)"
INTERNAL_ERROR = "Something went wrong on our side while answering. Please try again."
INTERRUPTED = "The bot is restarting and could not finish this answer. Please ask again in a moment."
GAVE_UP = "This message could not be answered (the bot stopped several times while answering it)."
NO_TEXT = "I can only read text messages for now. Please type your question."
NEW_CONVERSATION = "Started a new conversation. What would you like to ask?"


def help_text(prefix: str) -> str:
    return (
        "**Commands**\n\n"
        f"- `{prefix}new`: forget the context and start a new conversation\n"
        f"- `{prefix}help`: this help\n\n"
        "Anything else is answered by the AI app."
    )


class BridgeService:
    def __init__(
        self,
        *,
        bot: BotConfig,
        store: Store,
        answers: AnswerSource,
        replies: ReplyChannel,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.bot = bot
        self.store = store
        self.answers = answers
        self.replies = replies
        self.clock = clock
        self.policy = UpdatePolicy(interval=bot.card_update_interval, min_chars=bot.card_update_min_chars)
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = True
        self.answered = 0
        self.failed = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # --- entry points ------------------------------------------------------------------------------------

    def submit(self, message: IncomingMessage) -> bool:
        """Take a delivered message. Synchronous and quick: it runs before the frame is ACKed.

        Returns False when the message is a redelivery (or the bot is stopping) and will not be answered here.
        """
        key = session.message_key(message)
        if not self._accepting:
            log.warning("message %s arrived while stopping; not taken", message.msg_id)
            return False
        if not self.store.claim_message(key):
            log.info("message %s is a redelivery; already answered or being answered", message.msg_id)
            return False
        record = InFlight(key, dataclasses.asdict(message), session.out_track_id(message), attempts=1)
        self.store.begin_answer(record)
        log.info(
            "message %s from %s in %s chat %s (%s, %d chars)",
            message.msg_id, message.user_id, "group" if message.is_group else "1:1",
            message.conversation_id, message.msg_type, len(message.text),
        )  # fmt: skip
        self._spawn(message, record, resumed=False)
        return True

    def recover(self) -> int:
        """Finish the answers an earlier process of this bot started and did not end (it crashed or was killed)."""
        resumed = 0
        for record in self.store.unfinished_answers():
            try:
                message = IncomingMessage(**record.message)
            except TypeError:
                self.store.end_answer(record.message_key)
                continue
            record = dataclasses.replace(record, attempts=record.attempts + 1)
            self.store.begin_answer(record)
            log.warning(
                "resuming message %s left unanswered by an earlier process (attempt %d)",
                message.msg_id,
                record.attempts,
            )
            self._spawn(message, record, resumed=True)
            resumed += 1
        return resumed

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
        task = asyncio.create_task(self._answer(message, record, resumed), name=f"answer-{message.msg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, message: IncomingMessage, record: InFlight, resumed: bool) -> None:
        started = self.clock()
        card = self.replies.card(message, record.out_track_id)

        async def plain(text: str) -> None:
            await self.replies.plain_reply(message, text)

        streamer = CardStreamer(card, self.policy, plain, self.clock)
        outcome = "failed"
        try:
            await streamer.open(already_exists_ok=resumed)
            if record.attempts > MAX_ATTEMPTS:
                await streamer.fail(GAVE_UP)
                return
            outcome = await self._respond(message, streamer)
        except asyncio.CancelledError:
            outcome = "interrupted"
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(streamer.fail(_with_note(streamer.text, INTERRUPTED))), 10)
            raise
        except PeerError as exc:
            log.warning(
                "message %s: %s (status=%s code=%s): %s",
                message.msg_id,
                type(exc).__name__,
                getattr(exc, "status", None),
                getattr(exc, "code", None),
                exc,
            )
            await streamer.fail(_with_note(streamer.text, exc.user_message))
        except Exception:
            log.exception("message %s: unexpected error", message.msg_id)
            await streamer.fail(_with_note(streamer.text, INTERNAL_ERROR))
        finally:
            self.store.end_answer(record.message_key)
            if outcome == "answered":
                self.answered += 1
            else:
                self.failed += 1
            log.info(
                "message %s %s in %.2fs (%d card updates, %d chars)",
                message.msg_id,
                outcome,
                self.clock() - started,
                streamer.updates_sent,
                len(streamer.text),
            )

    async def _respond(self, message: IncomingMessage, streamer: CardStreamer) -> str:
        text = message.text.strip()
        prefix = self.bot.command_prefix
        if text.startswith(prefix):
            command = text[len(prefix) :].split(maxsplit=1)[0].lower() if text[len(prefix) :].strip() else ""
            if command == "new":
                self.store.forget_conversation(session.session_key(self.bot.name, message, self.bot.session_scope))
                await streamer.finish(NEW_CONVERSATION)
                return "answered"
            if command == "help":
                await streamer.finish(help_text(prefix))
                return "answered"
            # anything else, e.g. `/summarize`, is the Dify app's business
        if not text:
            await streamer.finish(NO_TEXT)
            return "answered"
        answer = await self._ask_dify(message, text, streamer)
        await streamer.finish(answer or EMPTY_ANSWER)
        return "answered"

    async def _ask_dify(self, message: IncomingMessage, text: str, streamer: CardStreamer) -> str:
        scope = self.bot.session_scope
        key = session.session_key(self.bot.name, message, scope)
        conversation_id = self.store.get_conversation(key)
        try:
            return await self._stream(message, text, key, conversation_id, streamer)
        except ConversationNotFound:
            if conversation_id is None:
                raise
            # expired or deleted on the Dify side: start afresh, once
            log.info("message %s: conversation expired on the Dify side; starting a new one", message.msg_id)
            self.store.forget_conversation(key)
            return await self._stream(message, text, key, None, streamer)

    async def _stream(
        self, message: IncomingMessage, text: str, key: str, conversation_id: str | None, streamer: CardStreamer
    ) -> str:
        answer = ""
        remembered = conversation_id
        ttl = self.bot.conversation_ttl
        stream = self.answers.stream_answer(
            query=text,
            user=session.dify_user(message, self.bot.session_scope),
            conversation_id=conversation_id,
            inputs=self._inputs(message),
        )
        async for event in stream:
            if event.conversation_id and event.conversation_id != remembered:
                # remember at once: even if this answer fails later, the next message continues the conversation
                self.store.set_conversation(key, event.conversation_id, ttl)
                remembered = event.conversation_id
            if isinstance(event, TextDelta):
                answer += event.text
                streamer.set_text(answer)
            elif isinstance(event, TextReplace):
                answer = event.text
                streamer.set_text(answer)
            elif isinstance(event, WorkflowFinished) and not answer:
                answer = text_from_outputs(event.outputs)
            elif isinstance(event, MessageEnd):
                break
        if remembered:
            self.store.set_conversation(key, remembered, ttl)  # sliding expiry: every turn restarts the clock
        return answer

    @staticmethod
    def _inputs(message: IncomingMessage) -> dict[str, Any]:
        # `sys_user_id` is what dify-on-dingtalk passed; apps built for it may declare it. Dify ignores
        # inputs an app does not declare.
        return {"sys_user_id": message.sender_staff_id} if message.sender_staff_id else {}


def _with_note(partial: str, note: str) -> str:
    """Keep what was already answered and say clearly why it stopped."""
    return f"{partial.rstrip()}\n\n---\n⚠️ {note}" if partial.strip() else f"⚠️ {note}"
