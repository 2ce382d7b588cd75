"""The AI card one answer streams into: create and deliver it, replace its text as the answer grows, and
end it as done or failed. Works with a template the admin owns (streamed variable `content`) or, with no
template id, with DingTalk's built-in AI card template the SDK's `AIMarkdownCardInstance` uses (variable
`msgContent` plus a `flowStatus` the card shows as processing / typing / done / failed).

Every method makes exactly one DingTalk call, so the card-call scheduler's one turn is one call: the built-in
template's first text switches it to "typing" in the same card-data call, and its end sets the final state
with the full text in one card-data call, as the SDK's `ai_finish` does.
"""

from __future__ import annotations

import json
import logging

from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)

BUILTIN_TEMPLATE_ID = "382e4302-551d-4880-bf29-a30acfab2e71.schema"
BUILTIN_CONTENT_KEY = "msgContent"
TEMPLATE_CONTENT_KEY = "content"

# AICardStatus of the SDK (flowStatus values of the built-in template).
FLOW_PROCESSING = "1"
FLOW_INPUTING = "2"
FLOW_FINISHED = "3"
FLOW_FAILED = "5"

# The SDK's default display order of the built-in template's blocks.
_BUILTIN_ORDER = [
    "msgTitle", "msgContent", "staticMsgContent", "msgTextList", "msgImages", "msgSlider", "msgButtons",
]
_BUILTIN_LAYOUT = json.dumps({"order": _BUILTIN_ORDER})


class AICard:
    """One reply card. `update` and `finish` take the full text so far (never a delta)."""

    def __init__(
        self,
        api: DingTalkApi,
        *,
        out_track_id: str,
        template_id: str | None,
        message: IncomingMessage,
        attempts: int | None = None,
    ):
        """`attempts`: tries per call (None: the API's default); 1 when a scheduler does the retrying."""
        self._api = api
        self._attempts = attempts
        self.out_track_id = out_track_id
        self._message = message
        self._builtin = not template_id
        self.template_id = template_id or BUILTIN_TEMPLATE_ID
        self.content_key = BUILTIN_CONTENT_KEY if self._builtin else TEMPLATE_CONTENT_KEY
        self._inputing = False
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once `finish` or `fail` went through: later calls do nothing."""
        return self._closed

    def _builtin_data(self, flow_status: str, text: str) -> dict[str, str]:
        return {
            BUILTIN_CONTENT_KEY: text,
            "staticMsgContent": "",
            "flowStatus": flow_status,
            "sys_full_json_obj": _BUILTIN_LAYOUT,
        }

    async def open(self) -> None:
        message = self._message
        card_data = self._builtin_data(FLOW_PROCESSING, "") if self._builtin else {TEMPLATE_CONTENT_KEY: ""}
        await self._api.create_and_deliver_card(
            out_track_id=self.out_track_id,
            template_id=self.template_id,
            card_data=card_data,
            conversation_type=message.conversation_type,
            conversation_id=message.conversation_id,
            sender_staff_id=message.sender_staff_id,
            robot_code=message.robot_code,
            attempts=self._attempts,
        )
        log.debug("card %s opened for message %s", self.out_track_id, message.msg_id)

    async def update(self, text: str) -> None:
        if self._closed:
            return
        if self._builtin and not self._inputing:
            # The built-in template shows "processing" until told it is typing: tell it with the first text.
            await self._set_data(self._builtin_data(FLOW_INPUTING, text))
            self._inputing = True
            return
        await self._api.stream_card(
            out_track_id=self.out_track_id, key=self.content_key, content=text, attempts=self._attempts
        )

    async def finish(self, text: str) -> None:
        if self._closed:
            return
        if self._builtin:
            # The final state carries the exact text, so the card is right even if a stream call was lost.
            await self._set_data(self._builtin_data(FLOW_FINISHED, text))
        else:
            await self._api.stream_card(
                out_track_id=self.out_track_id, key=self.content_key, content=text, finalize=True,
                attempts=self._attempts,
            )  # fmt: skip
        self._closed = True

    async def fail(self, text: str) -> None:
        if self._closed:
            return
        if self._builtin:
            await self._set_data(self._builtin_data(FLOW_FAILED, text))
        else:
            await self._api.stream_card(
                out_track_id=self.out_track_id, key=self.content_key, content=text, finalize=True, error=True,
                attempts=self._attempts,
            )  # fmt: skip
        self._closed = True

    async def _set_data(self, card_data: dict[str, str]) -> None:
        await self._api.update_card_data(
            out_track_id=self.out_track_id, card_data=card_data, attempts=self._attempts
        )
