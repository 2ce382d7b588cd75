"""Messages that must not reach Dify as they are: pure rules, decided before anything is asked.

DingTalk sometimes delivers what is not a question: a payload with an `errorMessage` instead of its content
(the organisation's robot message quota is used up, code 20001), a message with no sender or conversation to
answer, or text far longer than any app is built for. None of these may break the bot; where a person is
waiting, they are told plainly what happened, and the log says why (never with the message text).
"""

from __future__ import annotations

import logging

from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)

DINGTALK_ERROR = (
    "DingTalk did not pass your message on to me (it reported a problem instead, for example that the "
    "organisation's robot message quota is used up). Please tell the admin of this bot."
)
TOO_LONG = (
    "Your message is too long for me ({length:,} characters; I read up to {limit:,}). "
    "Please shorten it or send it in parts."
)


def answerable(message: IncomingMessage) -> bool:
    """Whether there is someone to answer: a sender and a conversation to put the answer in."""
    return bool(message.user_id and message.conversation_id)


def delivery_error(message: IncomingMessage) -> str | None:
    """The error DingTalk delivered instead of the message content, if it did."""
    error = message.content.get("errorMessage")
    if error is None or error == "":
        return None
    return str(error)


def refusal(message: IncomingMessage, *, max_chars: int) -> str | None:
    """What to tell the person instead of asking Dify, or None when the message may go on."""
    error = delivery_error(message)
    if error is not None:
        # DingTalk's own words, not the person's: safe to log (shortened)
        log.warning(
            "message %s: DingTalk delivered an error instead of its content: %.200r", message.msg_id, error
        )
        return DINGTALK_ERROR
    length = len(message.text)
    if length > max_chars:
        log.warning("message %s refused: %d characters, more than max_message_chars (%d)", message.msg_id,
                    length, max_chars)  # fmt: skip
        return TOO_LONG.format(length=length, limit=max_chars)
    return None
