"""The bot process's entry: what the supervisor forks into (through `dingdifyd.worker.run_bot`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from multiprocessing.connection import Connection

from dingdifyd.config import BotConfig, DaemonConfig
from dingdifyd.errors import EX_CONFIG, ConfigError
from dingdifyd.worker.heartbeat import ParentChannel
from dingdifyd.worker.runtime import BotRuntime
from dingdifyd.worker.stats import BotStats, ProblemRecorder

log = logging.getLogger(__name__)


def bot_process_main(bot: BotConfig, daemon: DaemonConfig, conn: Connection) -> None:
    """The child process. The supervisor has already reset inherited signal state and set up logging."""
    channel = ParentChannel(conn)
    stats = BotStats()
    logging.getLogger().addHandler(ProblemRecorder(stats))  # the last error `dingdifyd status` shows
    try:
        code = asyncio.run(_run_with_signals(bot, daemon, channel, stats))
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config: %s", problem)
        code = EX_CONFIG
    # a last word before exiting: why (the supervisor shows it for a bot it gave up on), and the final counts
    channel.heartbeat(0, stats.report())
    sys.exit(code)


async def _run_with_signals(bot: BotConfig, daemon: DaemonConfig, channel: ParentChannel, stats: BotStats) -> int:
    runtime = BotRuntime(bot, daemon, channel, stats=stats)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.request_stop)
    # SIGHUP is the supervisor's business; a bot process ignores it
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    return await runtime.run()
