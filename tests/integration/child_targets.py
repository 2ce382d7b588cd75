"""Bot-process targets for the supervisor tests, chosen by the bot name's prefix (`steady-a`, `fatal-x`, ...).

Each records its pid in `<state_dir>/<bot>.pids` when it starts and in `<bot>.term` when it receives SIGTERM,
so a test can tell a restart (new pid) from a survivor (same pid) and see who was asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from dingdifyd.config import BotConfig, DaemonConfig, Secret
from dingdifyd.errors import EX_CONFIG
from dingdifyd.logs import setup as logsetup
from dingdifyd.worker.heartbeat import ParentChannel, heartbeat_loop

BEAT = 0.1  # heartbeat interval; the tests use heartbeat_timeout 1 s
HANG_AFTER = 0.3
IN_FLIGHT = 1  # each running target reports one conversation in flight


def dispatch(bot: BotConfig, daemon: DaemonConfig, conn: Connection) -> None:
    record(bot, "pids")
    kind = bot.name.split("-", 1)[0]
    channel = ParentChannel(conn)
    if kind == "fatal":
        sys.exit(EX_CONFIG)
    if kind == "secrets":
        write_secrets_held(bot)
        kind = "steady"
    if kind not in ("steady", "hang", "stubborn", "offline"):
        raise ValueError(f"no test target for {bot.name}")
    sys.exit(asyncio.run(serve(bot, channel, hang=kind == "hang", ignore_term=kind == "stubborn",
                               offline=kind == "offline")))  # fmt: skip


def write_secrets_held(bot: BotConfig) -> None:
    """Every secret value this process can reach: live Secret objects (its config, the supervisor's objects it
    inherited by fork) and the log redaction's list."""
    held: set[str] = set()
    for obj in gc.get_objects():
        if isinstance(obj, Secret):
            with contextlib.suppress(Exception):
                held.add(obj.reveal())
    held |= set(logsetup._secrets)
    (Path(bot.state_dir) / f"{bot.name}.secrets").write_text(json.dumps(sorted(held)))


def record(bot: BotConfig, what: str) -> None:
    with open(Path(bot.state_dir) / f"{bot.name}.{what}", "a", encoding="ascii") as file:
        file.write(f"{os.getpid()}\n")


OFFLINE_PROBLEM = "DingTalk Stream: gateway open failed (ClientConnectorError)"


async def serve(bot: BotConfig, channel: ParentChannel, *, hang: bool, ignore_term: bool, offline: bool = False) -> int:
    """Connect and heartbeat until SIGTERM (or the supervisor is gone); `hang` blocks the loop after a while;
    `offline` never connects, and says why (a gateway that cannot be reached)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_term() -> None:
        record(bot, "term")
        if not ignore_term:
            stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_term)
    beats = asyncio.create_task(heartbeat_loop(channel, BEAT, lambda: IN_FLIGHT))
    if offline:
        channel.problem(OFFLINE_PROBLEM)
    else:
        channel.connected()
    if hang:
        await asyncio.sleep(HANG_AFTER)
        while True:
            time.sleep(1)  # blocks the event loop: heartbeats stop, and SIGTERM's handler can never run
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({beats, stopping}, return_when=asyncio.FIRST_COMPLETED)
    channel.disconnected()
    beats.cancel()
    stopping.cancel()
    return 0
