"""The supervisor: one forked process per bot, restarts with back-off, sd_notify. See `arbiter.Arbiter`.

No asyncio and no threads here: it forks. It never names what runs in a bot process; it is handed it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dingdifyd.supervisor.arbiter import ChildTarget


def main(config_path: str, target: ChildTarget, bot_names: list[str] | None = None) -> int:
    """`dingdifyd run`: supervise the bots in `config_path` (or those named), each running `target` in a
    process of its own, until stopped; the exit code."""
    from dingdifyd.logs.setup import setup_logging
    from dingdifyd.supervisor.arbiter import Arbiter

    setup_logging("INFO")  # until the config names the level: its own errors must be logged too
    return Arbiter(config_path, bot_names=bot_names, target=target).run()
