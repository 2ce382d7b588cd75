"""The supervisor: one forked process per bot, restarts with back-off, sd_notify. See `arbiter.Arbiter`."""

from __future__ import annotations

from multiprocessing.connection import Connection

from dingdifyd.config import BotConfig, DaemonConfig


def main(config_path: str, bot_names: list[str] | None = None) -> int:
    """`dingdifyd run`: supervise the bots in `config_path` (or those named) until stopped; the exit code."""
    from dingdifyd.logsetup import setup_logging
    from dingdifyd.supervisor.arbiter import Arbiter

    setup_logging("INFO")  # until the config names the level: its own errors must be logged too
    return Arbiter(config_path, bot_names=bot_names, target=run_bot).run()


def run_bot(bot: BotConfig, daemon: DaemonConfig, conn: Connection) -> None:
    """The child's target. The bot runtime (aiohttp, the SDK, diskcache) is imported here, after fork: the
    supervisor stays small and holds nothing a child could inherit half-initialised."""
    from dingdifyd.worker import bot_process_main

    bot_process_main(bot, daemon, conn)
