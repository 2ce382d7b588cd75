"""Who is talking, in which context: the pure rules for session keys and Dify user ids (docs/design.md#sessions)."""

from __future__ import annotations

import hashlib

from dingdifyd.models import IncomingMessage


def message_key(message: IncomingMessage) -> str:
    """The de-duplication key: the same message redelivered, to any process or host, has the same key."""
    return f"{message.robot_code}:{message.msg_id}"


def out_track_id(message: IncomingMessage) -> str:
    """The card id is derived from the de-duplication key, so a redelivery can never produce a second card."""
    return hashlib.sha256(message_key(message).encode()).hexdigest()


def session_key(bot: str, message: IncomingMessage, scope: str) -> str:
    """1:1 -> (bot, user); group -> (bot, group, user), or (bot, group) when the group shares one context."""
    if not message.is_group:
        return f"{bot}|single|{message.user_id}"
    if scope == "chat":
        return f"{bot}|group|{message.conversation_id}"
    return f"{bot}|group|{message.conversation_id}|{message.user_id}"


def dify_user(message: IncomingMessage, scope: str) -> str:
    """A stable Dify end-user id, never the nickname (it changes, and is not unique).

    Dify scopes conversations to (app, user), so a group that shares one context must also share one user.
    """
    corp = message.sender_corp_id or "-"
    if message.is_group and scope == "chat":
        return f"dingtalk:{corp}:group:{message.conversation_id}"
    return f"dingtalk:{corp}:{message.user_id}"
