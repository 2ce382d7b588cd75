"""Chat commands: `/new`, `/stop`, `/help` (prefix configurable). Anything else that starts with the prefix is
the Dify app's business (e.g. a `/summarize` its prompt understands) and goes to it as text.

Commands act on the person's session (the same key the answers use), never wait for a running answer, and
their reply goes into the command message's own card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dingdifyd.bridge.running import RunningAnswers
from dingdifyd.store.base import Store

log = logging.getLogger(__name__)

NEW_CONVERSATION = "Started a new conversation. What would you like to ask?"
STOPPING = "Stopped the answer in progress."
NOTHING_TO_STOP = "Nothing is being answered right now, so there is nothing to stop."


@dataclass(frozen=True)
class Command:
    name: str  # lower case, without the prefix
    argument: str


def parse_command(text: str, prefix: str) -> Command | None:
    """The command in a message, or None when the message is not one (`/` alone is not a command)."""
    text = text.strip()
    if not prefix or not text.startswith(prefix):
        return None
    rest = text[len(prefix) :].strip()
    if not rest:
        return None
    name, _, argument = rest.partition(" ")
    return Command(name.lower(), argument.strip())


def help_text(prefix: str) -> str:
    return (
        "**Commands**\n\n"
        f"- `{prefix}new`: forget the context and start a new conversation\n"
        f"- `{prefix}stop`: stop the answer being written\n"
        f"- `{prefix}help`: this help\n\n"
        "Anything else is answered by the AI app."
    )


class ChatCommands:
    KNOWN = ("new", "stop", "help")

    def __init__(self, prefix: str, store: Store, running: RunningAnswers):
        self.prefix = prefix
        self.store = store
        self.running = running

    async def handle(self, text: str, session_key: str) -> str | None:
        """The reply to a command, or None when `text` is not one of ours (it then goes to Dify)."""
        command = parse_command(text, self.prefix)
        if command is None or command.name not in self.KNOWN:
            return None
        log.info("command %s in session %s", command.name, session_key)
        if command.name == "new":
            self.store.forget_conversation(session_key)
            # an answer still running in the old context must not write that context back when it ends
            self.running.detach_session(session_key)
            return NEW_CONVERSATION
        if command.name == "stop":
            stopped = await self.running.stop_session(session_key)
            return STOPPING if stopped else NOTHING_TO_STOP
        return help_text(self.prefix)
