"""Structured fields for the journal: which bot, which message, which conversation, which event.

A log call names its event with `extra=event("answered", ...)`; the lines of one message's handling carry its
id and conversation without saying so, from a context variable set in the answer's task (`message_context()`),
which asyncio copies into the tasks it starts. The journal handler (logs/journal.py) turns these into
`DINGDIFYD_*` fields and the event's `MESSAGE_ID`; the plain text handler ignores them, so a terminal shows the
same lines as ever.

`MESSAGE_ID`s are fixed for good: `journalctl MESSAGE_ID=...` queries and catalogs may rely on them.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Mapping
from typing import Any

RECORD_ATTRIBUTE = "dingdifyd_fields"  # where `event()` puts the fields on a LogRecord

# DINGDIFYD_EVENT -> MESSAGE_ID
EVENTS: Mapping[str, str] = {
    # one message (bot process)
    "received": "e05b2e7ca49e41ff8a67b23fbe265141",
    "answered": "174d0f5151784c239d7606e64a118d1a",
    "failed": "84f4ebedfea845feabc3e800beb0e406",
    "interrupted": "bc872224570142fcb8e071bc0312b8ee",
    "refused": "a576adf337674e4eb423eabea59020c5",
    "duplicate": "c1a3580588aa48289e30e6619a157b48",
    # the bot process's connection (bot process) and life (supervisor)
    "connected": "2b8bbf241c164e518adf946ec2147dd7",
    "disconnected": "d2e6b901658743ae9215f2327ec06529",
    "started": "971d866b519842b1adf65b4372fd0075",
    "restarted": "6ca6dfdc21c9410f800598cfc8e9597a",
    "exited": "9cd024ea882046749779e110e99fbf73",
    "unresponsive": "bc78b21f0e1c4423ba4fb7bb7d578d61",
    "fatal": "00a8c5101ca4401287d3b2e2f20dde1e",
    # the whole daemon (supervisor)
    "ready": "8a2fd40e29904eb692e54d02a01cdf63",
    "reloaded": "7ec39859da664bb791b2ec579c58f602",
    "stopping": "e2b3e59becd64086a47cc2b87c73dd46",
    "stopped": "8b1d46f0ddf7447fab55c8ddf1ed156d",
}

_message: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("dingdifyd_message", default=None)


def conversation_hash(conversation_id: str) -> str:
    """A short, stable stand-in for a DingTalk conversation: enough to group one chat's lines, and no way back
    to the chat (or its title)."""
    return hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:12]


def message_fields(msg_id: str, conversation_id: str = "") -> dict[str, str]:
    fields = {"DINGDIFYD_MSG_ID": msg_id}
    if conversation_id:
        fields["DINGDIFYD_CONVERSATION"] = conversation_hash(conversation_id)
    return fields


def event(
    kind: str | None = None, *, bot: str | None = None, msg_id: str | None = None, conversation_id: str | None = None
) -> dict[str, Any]:
    """`extra=` for a log call: the event it reports and what it is about."""
    fields: dict[str, str] = {}
    if kind is not None:
        fields["DINGDIFYD_EVENT"] = kind
        fields["MESSAGE_ID"] = EVENTS[kind]
    if bot:
        fields["DINGDIFYD_BOT"] = bot
    if msg_id:
        fields.update(message_fields(msg_id, conversation_id or ""))
    return {RECORD_ATTRIBUTE: fields}


def message_context(msg_id: str, conversation_id: str = "") -> contextvars.Context:
    """A context for a task that handles this message (`asyncio.create_task(..., context=...)`)."""
    context = contextvars.copy_context()
    context.run(_message.set, message_fields(msg_id, conversation_id))
    return context


def fields_of(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields of a record: its message's (from the context it was logged in), then its own.

    Read while the record is emitted, which logging does synchronously in the caller's context."""
    fields = dict(_message.get() or {})
    fields.update(getattr(record, RECORD_ATTRIBUTE, None) or {})
    return fields
