"""The bridge's ReplyChannel on DingTalk: an AI card per message, a markdown reply through the
conversation's sessionWebhook when no card can be written."""

from __future__ import annotations

from dingdifyd.bridge.models import IncomingMessage
from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.dingtalk.cards import AICard
from dingdifyd.errors import DingTalkError

REPLY_TITLE = "Answer"


class DingTalkReplies:
    def __init__(self, api: DingTalkApi, template_id: str | None):
        self.api = api
        self.template_id = template_id

    def card(self, message: IncomingMessage, out_track_id: str) -> AICard:
        return AICard(self.api, out_track_id=out_track_id, template_id=self.template_id, message=message)

    async def plain_reply(self, message: IncomingMessage, markdown: str) -> None:
        if not message.session_webhook:
            raise DingTalkError("no sessionWebhook in the message to reply through")
        at = [message.sender_staff_id] if message.is_group and message.sender_staff_id else []
        await self.api.reply_via_webhook(message.session_webhook, title=REPLY_TITLE, markdown=markdown, at_user_ids=at)
