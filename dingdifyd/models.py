"""What the bridge works with: an incoming chat message, independent of the DingTalk SDK's classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SINGLE_CHAT = "1"
GROUP_CHAT = "2"


@dataclass(frozen=True)
class IncomingMessage:
    """One message a person sent to the robot (DingTalk `/v1.0/im/bot/messages/get` data, normalised)."""

    robot_code: str
    msg_id: str
    msg_type: str  # text | picture | richText | audio | video | file | unknownMsgType | ...
    text: str  # the text to answer: message text, voice recognition, rich-text text parts; "" if none
    conversation_id: str
    conversation_type: str  # "1" 1:1 with the robot, "2" group
    sender_id: str  # encrypted, stable per user and robot
    sender_staff_id: str = ""  # the userid; empty for external users
    sender_nick: str = ""  # display name: shown, never used as an identity
    sender_corp_id: str = ""
    conversation_title: str = ""
    session_webhook: str = ""
    session_webhook_expires_ms: int = 0
    created_at_ms: int = 0
    content: dict[str, Any] = field(default_factory=dict, compare=False)  # type-specific payload (files, ...)

    @property
    def is_group(self) -> bool:
        return self.conversation_type == GROUP_CHAT

    @property
    def user_id(self) -> str:
        """The most stable id of the sender: the staff id when DingTalk gives one, else the encrypted sender id."""
        return self.sender_staff_id or self.sender_id
