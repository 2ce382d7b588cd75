"""`dingdifyd chat`: talk to a bot's Dify app from the terminal, through the same bridge code as the daemon.

The terminal plays the DingTalk card: streamed updates are printed as they would appear (typewriter), and the
session, store, Dify client and error handling are the daemon's own. Useful before DingTalk is set up.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TextIO

from dingdifyd import config as config_mod
from dingdifyd.appsetup import bot_client, dify_session, start_apps
from dingdifyd.bridge.markdown import for_plain_reply
from dingdifyd.bridge.models import SINGLE_CHAT, IncomingMessage
from dingdifyd.bridge.service import BridgeService
from dingdifyd.dify.guarded import GuardedAnswers
from dingdifyd.store import DiskStore

log = logging.getLogger(__name__)
PROMPT = "bot> "


class TerminalCard:
    """A card rendered on a terminal: prints only what is new, and marks the end.

    A card's text is replaced, not extended, when a progress line ("⏳ …") gives way to the answer, or when an
    error note follows a partial answer: the terminal then starts a new line instead of rewriting the old one.
    """

    def __init__(self, out: TextIO):
        self.out = out
        self.shown = ""

    async def open(self) -> None:
        self.out.write(PROMPT)
        self.out.flush()

    def _show(self, card_text: str) -> None:
        text = for_plain_reply(card_text)  # a terminal breaks lines at \n, not at the card's <br>
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
        else:
            self.out.write(f"\n{PROMPT}{text}")
        self.shown = text
        self.out.flush()

    async def update(self, text: str) -> None:
        self._show(text)

    async def finish(self, text: str) -> None:
        self._show(text)
        self.out.write("\n\n")
        self.out.flush()

    fail = finish


class TerminalReplies:
    def __init__(self, out: TextIO):
        self.out = out

    def card(self, message: IncomingMessage, out_track_id: str) -> TerminalCard:
        return TerminalCard(self.out)

    async def plain_reply(self, message: IncomingMessage, markdown: str) -> None:
        self.out.write(f"{PROMPT}{for_plain_reply(markdown)}\n\n")


def run_chat(config_path: str, bot_name: str, user: str) -> int:
    loaded = config_mod.load(config_path)
    try:
        bot = loaded.bot(bot_name)
    except KeyError:
        names = ", ".join(b.name for b in loaded.bots)
        raise config_mod.ConfigError([f"--bot: no bot named {bot_name!r} in {config_path} (bots: {names})"]) from None
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
    return asyncio.run(_chat(bot, user, sys.stdin, sys.stdout))


async def _chat(bot: config_mod.BotConfig, user: str, stdin: TextIO, out: TextIO) -> int:
    # A store of its own: the terminal must not share de-dup records or contexts with a running daemon.
    state = Path(tempfile.mkdtemp(prefix="dingdifyd-chat-"))
    store = DiskStore(state)
    out.write(
        f"Chatting with {bot.name} ({bot.dify_app_type} at {bot.dify_open_api_url}). "
        f"Type {bot.command_prefix}new for a new conversation, an empty line or Ctrl-D to quit.\n\n"
    )
    async with dify_session() as http:
        # the daemon's own app setup: the same checks (key, app type) and the same guarded answer streams
        apps = await start_apps(bot, bot_client(bot, http), http, where=f"bot {bot.name}", guard=GuardedAnswers)
        bridge = BridgeService(bot=bot, store=store, apps=apps, replies=TerminalReplies(out))
        loop = asyncio.get_running_loop()
        while True:
            out.write("you> ")
            out.flush()
            line = await loop.run_in_executor(None, stdin.readline)
            if not line.strip():
                break
            message = IncomingMessage(
                robot_code=bot.dingtalk_app_client_id, msg_id=uuid.uuid4().hex, msg_type="text", text=line.strip(),
                conversation_id=f"terminal-{user}", conversation_type=SINGLE_CHAT, sender_id=user,
                sender_staff_id=user, sender_nick=user, created_at_ms=int(time.time() * 1000),
            )  # fmt: skip
            bridge.submit(message)
            await bridge.wait_idle()
    store.close()
    return 0
