"""The bridge's ReplyChannel on DingTalk, with its fallback ladder.

A card per message: the configured template, or DingTalk's built-in AI card template when that one is refused
(not found, unpublished). When no card can be written, a markdown reply: through the message's
sessionWebhook, or through the robot send API when the webhook has expired or refuses. Each failure's cause is
logged once per process with a fix hint (fallback.py); the per-answer details stay at DEBUG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.dingtalk.cards import AICard
from dingdifyd.dingtalk.fallback import TEMPLATE_CODES, CauseLog, TemplateMemory
from dingdifyd.errors import DingTalkError, PeerError
from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)

REPLY_TITLE = "Answer"
CARDS_OFF = "cardsOff"
# A webhook this close to its expiry is not worth trying: the reply would race the expiry.
WEBHOOK_MARGIN_MS = 5_000


def webhook_usable(message: IncomingMessage, now_ms: int) -> bool:
    """The message has a sessionWebhook that has not expired (an unknown expiry counts as valid)."""
    if not message.session_webhook:
        return False
    expires = message.session_webhook_expires_ms
    return expires <= 0 or expires - WEBHOOK_MARGIN_MS > now_ms


class DingTalkReplies:
    def __init__(
        self,
        api: DingTalkApi,
        template_id: str | None,
        *,
        memory: TemplateMemory | None = None,
        causes: CauseLog | None = None,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ):
        self.api = api
        self.template_id = template_id
        self.memory = memory or TemplateMemory(template_id)
        self.causes = causes or CauseLog(log)
        self._now_ms = wall_clock_ms

    def card(self, message: IncomingMessage, out_track_id: str) -> LadderCard:
        return LadderCard(self, message, out_track_id)

    async def plain_reply(self, message: IncomingMessage, markdown: str) -> None:
        if webhook_usable(message, self._now_ms()):
            try:
                at = [message.sender_staff_id] if message.is_group and message.sender_staff_id else []
                await self.api.reply_via_webhook(
                    message.session_webhook, title=REPLY_TITLE, markdown=markdown, at_user_ids=at
                )
                return
            except PeerError as exc:
                self.causes.failed("the sessionWebhook reply", exc, "replying through the robot send API")
        else:
            self.causes.note(
                "the sessionWebhook reply", "expired",
                "the message's sessionWebhook has expired (or there is none); replying through the robot send API",
            )  # fmt: skip
        try:
            await self.api.send_robot_markdown(
                robot_code=message.robot_code, conversation_type=message.conversation_type,
                conversation_id=message.conversation_id, staff_id=message.sender_staff_id,
                title=REPLY_TITLE, markdown=markdown,
            )  # fmt: skip
        except PeerError as exc:
            self.causes.failed("the robot send API", exc, "the answer could not be delivered")
            raise


class LadderCard:
    """The bridge's CardSink on DingTalk: starts on the first usable rung and, when its template is refused, can
    `fall_back` to the built-in one. One DingTalk call per method (the scheduler counts on it), attempts left to
    the scheduler; `open` raises CardAlreadyExists when DingTalk has the card already."""

    def __init__(self, replies: DingTalkReplies, message: IncomingMessage, out_track_id: str):
        self._replies = replies
        self._message = message
        self.out_track_id = out_track_id
        rungs = replies.memory.rungs()
        self.rung = rungs[0] if rungs else TemplateMemory.NONE
        self._card = self._make(self.rung)

    def _make(self, rung: str) -> AICard:
        template = self._replies.template_id if rung == TemplateMemory.CONFIGURED else None
        return AICard(self._replies.api, out_track_id=self.out_track_id, template_id=template,
                      message=self._message, attempts=1)

    @property
    def card(self) -> AICard:
        return self._card

    @property
    def available(self) -> bool:
        """False while cards are switched off after a refusal no template avoids: answer with a plain reply."""
        return self.rung != TemplateMemory.NONE

    async def open(self) -> None:
        if not self.available:
            raise DingTalkError("cards are switched off for a while after DingTalk refused them", code=CARDS_OFF)
        # a refusal for good is reported by fall_back, which the streamer asks next
        await self._guard("creating a card", self._card.open(), then=None)

    async def update(self, text: str) -> None:
        await self._guard("updating a card", self._card.update(text), then="the card waits for the final answer")

    async def finish(self, text: str) -> None:
        await self._guard("ending a card", self._card.finish(text), then="answering with a plain reply")

    async def fail(self, text: str) -> None:
        await self._guard("ending a card", self._card.fail(text), then="answering with a plain reply")

    def fall_back(self, exc: Exception) -> bool:
        """After `open` was refused for good: switch to the next rung and return True, or False at the end."""
        if self.rung == TemplateMemory.NONE:
            return False
        code = exc.code if isinstance(exc, PeerError) else None
        following = self._replies.memory.refused(self.rung, code)
        if self.rung == TemplateMemory.CONFIGURED:
            stage = f"creating a card with template {self._replies.template_id}"
        else:
            stage = "creating a card with the built-in AI card template"
        then = "using the built-in AI card template instead" if following else "answering with a plain reply"
        if self.rung == TemplateMemory.BUILTIN and code in TEMPLATE_CODES:
            self._replies.causes.note(
                stage, str(code), f"{stage} failed ({code}); {then}",
                "this DingTalk has no built-in AI card template (a private deployment?): create an AI card "
                "template with a streaming Markdown variable `content`, publish it, and set "
                "dingtalk_ai_card_template_id",
            )  # fmt: skip
        else:
            self._replies.causes.failed(stage, exc, then)
        if following is None:
            return False
        self.rung = following
        self._card = self._make(following)
        return True

    async def _guard(self, stage: str, call: Awaitable[None], *, then: str | None) -> None:
        try:
            await call
        except DingTalkError as exc:
            if exc.retryable:  # the scheduler retries
                self._replies.causes.failed(stage, exc, "retrying")
            elif then is not None:
                self._replies.memory.refused(TemplateMemory.BUILTIN, exc.code)  # may switch cards off a while
                self._replies.causes.failed(stage, exc, then)
            raise
