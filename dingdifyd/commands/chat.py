"""`dingdifyd chat`: talk to a bot's Dify app from the terminal, through the same bridge code as the daemon.

The terminal plays the DingTalk card: streamed updates are printed as they would appear (typewriter), and the
session, store, Dify client and error handling are the daemon's own. Useful before DingTalk is set up.

It behaves like the chat in DingTalk: lines are read while an answer streams, so a command (`/stop`, `/new`)
acts at once; questions are answered one after the other. Ctrl-C ends the chat: an answer being written ends
with "Interrupted" and its Dify run is stopped. Log lines never share a line with a card.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from dingdifyd import config as config_mod
from dingdifyd.bridge.commands import ChatCommands, parse_command
from dingdifyd.bridge.markdown import for_plain_reply
from dingdifyd.bridge.service import BridgeService
from dingdifyd.dify.guarded import GuardedAnswers
from dingdifyd.models import SINGLE_CHAT, IncomingMessage
from dingdifyd.store.disk import DiskStore
from dingdifyd.worker.apps import bot_client, dify_session, start_apps

log = logging.getLogger(__name__)
PROMPT = "bot> "
YOU = "you> "
INTERRUPTED = "Interrupted (Ctrl-C)."
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a program ended by Ctrl-C


class Screen:
    """The terminal's output, shared by every card, the prompt and log lines.

    It remembers what stands on the current line and who wrote it, so that a card whose line another card (or
    a log line) took starts a new line instead of continuing someone else's, and a log line never lands in the
    middle of a card: the card's line is broken before it and written again after it.
    """

    def __init__(self, out: TextIO, err: TextIO | None = None):
        self.out = out
        self.err = err
        self.line = ""  # what stands on the current line of `out`
        self.owner: object | None = None  # the card the current line belongs to; None: a prompt, or nothing
        # a log line and the cards share one screen only when stderr and stdout are the same terminal or pipe
        self.shared = err is not None and _same_file(out, err)

    def write(self, text: str, owner: object | None) -> None:
        self.out.write(text)
        self.out.flush()
        self.owner = owner
        _, newline, tail = text.rpartition("\n")
        self.line = tail if newline else self.line + text

    def start_line(self, owner: object | None) -> None:
        """Have a fresh line unless the current one is empty or only holds a prompt."""
        if self.line and self.owner is not None and self.owner is not owner:
            self.write("\n", None)

    def prompt(self) -> None:
        if self.line:
            self.write("\n", None)
        self.write(YOU, None)

    def input_echoed(self) -> None:
        """A line was typed: on a terminal its echo ended the current line."""
        self.line, self.owner = "", None

    def log(self, text: str) -> None:
        if self.err is None:
            return
        if not self.shared:
            self.err.write(text + "\n")
            self.err.flush()
            return
        pending = self.line
        if pending:
            self.out.write("\n")
            self.out.flush()
        self.err.write(text + "\n")
        self.err.flush()
        if pending:  # the card goes on where it was, on a line of its own again
            self.out.write(pending)
            self.out.flush()


def _same_file(a: TextIO, b: TextIO) -> bool:
    try:
        first, second = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


class ScreenLogHandler(logging.Handler):
    def __init__(self, screen: Screen):
        super().__init__()
        self.screen = screen
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.screen.log(self.format(record))
        except Exception:
            self.handleError(record)


class TerminalCard:
    """A card rendered on a terminal: prints only what is new, and marks the end.

    A card's text is replaced, not extended, when a progress line ("⏳ …") gives way to the answer, or when an
    error note follows a partial answer; and another card may have written meanwhile: the terminal then starts a
    new line instead of rewriting the old one.
    """

    available = True  # a terminal always shows cards

    def __init__(self, screen: Screen):
        self.screen = screen
        self.shown = ""

    def fall_back(self, exc: Exception) -> bool:
        return False  # opening never fails: there is nothing to fall back to

    async def open(self) -> None:
        # the prompt at once says the bot is on it; when another card is writing, this one waits for its text
        if self.screen.owner is None:
            self.screen.write(PROMPT, self)

    def _show(self, card_text: str) -> None:
        text = for_plain_reply(card_text)  # a terminal breaks lines at \n, not at the card's <br>
        if self.screen.owner is self and text.startswith(self.shown):
            self.screen.write(text[len(self.shown) :], self)
        else:
            self.screen.start_line(self)
            self.screen.write(f"\n{PROMPT}{text}" if self.screen.owner is self else f"{PROMPT}{text}", self)
        self.shown = text

    async def update(self, text: str) -> None:
        self._show(text)

    async def finish(self, text: str) -> None:
        self._show(text)
        self.screen.write("\n\n", None)

    fail = finish


class TerminalReplies:
    def __init__(self, screen: Screen):
        self.screen = screen

    def card(self, message: IncomingMessage, out_track_id: str) -> TerminalCard:
        return TerminalCard(self.screen)

    async def plain_reply(self, message: IncomingMessage, markdown: str) -> None:
        self.screen.start_line(None)
        self.screen.write(f"{PROMPT}{for_plain_reply(markdown)}\n\n", None)


def run_chat(config_path: str, bot_name: str, user: str) -> int:
    loaded = config_mod.load(config_path)
    try:
        bot = loaded.bot(bot_name)
    except KeyError:
        names = ", ".join(b.name for b in loaded.bots)
        raise config_mod.ConfigError([f"--bot: no bot named {bot_name!r} in {config_path} (bots: {names})"]) from None
    screen = Screen(sys.stdout, sys.stderr)
    logging.basicConfig(level=logging.WARNING, handlers=[ScreenLogHandler(screen)])
    return asyncio.run(_chat(bot, user, sys.stdin, screen))


def _read_lines(stdin: TextIO, deliver: Callable[[str | None], None]) -> None:
    """The reader thread: every line typed, then None at the end of input.

    It reads the file descriptor itself: a daemon thread blocked in a buffered reader at exit could hold the
    buffer's lock while the interpreter finalizes it.
    """
    try:
        fd = stdin.fileno()
    except (OSError, ValueError, AttributeError):
        for line in iter(stdin.readline, ""):
            deliver(line)
        deliver(None)
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := os.read(fd, 4096):
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            deliver(line + "\n")
    pending += decoder.decode(b"", final=True)
    if pending:
        deliver(pending)
    deliver(None)


async def _chat(bot: config_mod.BotConfig, user: str, stdin: TextIO, screen: Screen) -> int:
    # A store of its own: the terminal must not share de-dup records or contexts with a running daemon.
    state = Path(tempfile.mkdtemp(prefix="dingdifyd-chat-"))
    store = DiskStore(state)
    prefix = bot.conversation.command_prefix
    screen.write(
        f"Chatting with {bot.name} ({bot.dify.app_type} at {bot.dify.url}). "
        f"Type {prefix}new for a new conversation, {prefix}stop to stop an answer, "
        "an empty line or Ctrl-D to quit.\n\n",
        None,
    )
    try:
        async with dify_session() as http:
            # the daemon's own app setup: the same checks (key, app type) and the same guarded answer streams
            apps = await start_apps(bot, bot_client(bot, http), http, where=f"bot {bot.name}", guard=GuardedAnswers)
            bridge = BridgeService(
                bot=bot, store=store, apps=apps, replies=TerminalReplies(screen), interrupted_note=INTERRUPTED
            )
            return await _converse(bot, user, bridge, stdin, screen)
    finally:
        store.close()


async def _converse(bot: config_mod.BotConfig, user: str, bridge: BridgeService, stdin: TextIO, screen: Screen) -> int:
    loop = asyncio.get_running_loop()
    typed: asyncio.Queue[str | None] = asyncio.Queue()
    questions: asyncio.Queue[str | None] = asyncio.Queue()
    interrupted = asyncio.Event()
    echoes = stdin.isatty() if hasattr(stdin, "isatty") else False

    def submit(text: str) -> None:
        message = IncomingMessage(
            robot_code=bot.dingtalk.client_id, msg_id=uuid.uuid4().hex, msg_type="text", text=text,
            conversation_id=f"terminal-{user}", conversation_type=SINGLE_CHAT, sender_id=user,
            sender_staff_id=user, sender_nick=user, created_at_ms=int(time.time() * 1000),
        )  # fmt: skip
        bridge.submit(message)

    async def route() -> None:
        """A command typed while an answer is written is handled at once, as in DingTalk; questions wait."""
        while (line := await typed.get()) is not None and line.strip():
            if echoes:
                screen.input_echoed()
            text = line.strip()
            command = parse_command(text, bot.conversation.command_prefix)
            if command is not None and command.name in ChatCommands.KNOWN and bridge.in_flight:
                submit(text)
            else:
                questions.put_nowait(text)
        questions.put_nowait(None)

    async def answer() -> None:
        while (text := await questions.get()) is not None:
            submit(text)
            await bridge.wait_idle()
            if questions.empty():
                screen.prompt()
        await bridge.wait_idle()

    reader = threading.Thread(
        target=_read_lines, args=(stdin, lambda line: loop.call_soon_threadsafe(typed.put_nowait, line)),
        name="chat-input", daemon=True,
    )  # fmt: skip
    reader.start()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    screen.prompt()
    routing = asyncio.create_task(route(), name="chat-route")
    answering = asyncio.create_task(answer(), name="chat-answer")
    stop = asyncio.create_task(interrupted.wait(), name="chat-interrupt")
    try:
        await asyncio.wait({answering, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not interrupted.is_set():
            return 0
        # a second Ctrl-C while the answers end: Python's own, at once
        loop.remove_signal_handler(signal.SIGINT)
        routing.cancel()
        answering.cancel()
        # the daemon's graceful stop with no grace: each answer's card ends with INTERRUPTED, and its Dify run
        # is stopped (the answer streams are guarded: a cancelled one asks Dify to stop its task)
        await bridge.drain(0)
        screen.start_line(None)
        return EXIT_INTERRUPTED
    finally:
        for task in (routing, answering, stop):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(routing, answering, stop, return_exceptions=True)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
