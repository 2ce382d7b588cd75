"""The bot process: its runtime (runtime.py), its Dify apps (apps.py), its heartbeats and report to the
supervisor (heartbeat.py, stats.py), answers shared with other processes (adoption.py), and what DingTalk does
not say (delivery_watch.py). This module stays light: the `run` command imports it to name the target."""

from __future__ import annotations

from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dingdifyd.config import BotConfig, DaemonConfig


def run_bot(bot: BotConfig, daemon: DaemonConfig, conn: Connection) -> None:
    """The child's target. The bot runtime (aiohttp, the SDK, diskcache) is imported here, after fork: the
    supervisor stays small and holds nothing a child could inherit half-initialised."""
    from dingdifyd.worker.main import bot_process_main

    bot_process_main(bot, daemon, conn)
