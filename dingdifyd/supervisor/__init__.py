"""The supervisor: one forked process per bot, restarts with back-off, sd_notify. See `arbiter.Arbiter`."""

from __future__ import annotations


def main(config_path: str, bot_names: list[str] | None = None) -> int:
    """`dingdifyd run`: supervise the bots in `config_path` (or those named) until stopped; the exit code."""
    from dingdifyd.logsetup import setup_logging
    from dingdifyd.supervisor.arbiter import Arbiter

    setup_logging("INFO")  # until the config names the level: its own errors must be logged too
    from dingdifyd.worker import bot_process_main

    return Arbiter(config_path, bot_names=bot_names, target=bot_process_main).run()
