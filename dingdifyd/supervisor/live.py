"""What the supervisor knows of its bots besides their lifecycles, and the views made of it: the status document
`dingdifyd status` reads, and the metrics.

The arbiter tells it of each spawn, exit and report (a bot process's heartbeat stats); it reads the lifecycles
for the rest. No I/O: the endpoints (endpoints.py) serve what it builds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dingdifyd.supervisor.exposition import BotMetrics, BotTotals
from dingdifyd.supervisor.state import BotLifecycle, Phase

STATUS_VERSION = 1
EXIT_CONFIG = 78


@dataclass
class BotRecord:
    pid: int | None = None
    starts: int = 0
    last_exit: dict[str, Any] | None = None  # {"code": int | None, "at": wall time}
    report: dict[str, Any] = field(default_factory=dict)  # the bot process's own, latest (worker/stats.py)
    # from the process's own connected / disconnected messages, so a status asked before its next heartbeat
    # report already knows it
    connected_since: float | None = None
    metrics: BotTotals = field(default_factory=BotTotals)


class LiveView:
    def __init__(self, config_path: str, *, now: Callable[[], float] = time.time):
        self.config_path = config_path
        self.instance = Path(config_path).stem
        self._now = now
        self.started_at = now()
        self.bots: dict[str, BotRecord] = {}

    # --- what happened -----------------------------------------------------------------------------------

    def spawned(self, name: str, pid: int | None) -> bool:
        """A process was started for `name`; True when it replaces an earlier one (a restart)."""
        record = self.bots.setdefault(name, BotRecord())
        record.pid = pid
        record.starts += 1
        record.report = {}
        record.connected_since = None
        return record.starts > 1

    def connected(self, name: str, up: bool) -> None:
        record = self.bots.setdefault(name, BotRecord())
        if not up:
            record.connected_since = None
        elif record.connected_since is None:
            record.connected_since = self._now()

    def exited(self, name: str, code: int | None) -> None:
        record = self.bots.setdefault(name, BotRecord())
        record.pid = None
        record.connected_since = None
        record.last_exit = {"code": code, "at": self._now()}
        record.metrics.process_ended()

    def reported(self, name: str, stats: Mapping[str, Any]) -> None:
        record = self.bots.setdefault(name, BotRecord())
        status = stats.get("status")
        if isinstance(status, dict):
            record.report = status
        metrics = stats.get("metrics")
        if isinstance(metrics, dict):
            record.metrics.report(metrics)

    # --- views ---------------------------------------------------------------------------------------------

    def status_document(
        self,
        lifecycles: Mapping[str, BotLifecycle],
        names: list[str],
        *,
        status_line: str,
        ready: bool,
        stopping: bool,
        monotonic_now: float,
    ) -> dict[str, Any]:
        return {
            "version": STATUS_VERSION,
            "instance": self.instance,
            "config": self.config_path,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "status": status_line,
            "ready": ready,
            "stopping": stopping,
            "bots": [self._bot(name, lifecycles[name], monotonic_now) for name in names if name in lifecycles],
        }

    def _bot(self, name: str, lifecycle: BotLifecycle, monotonic_now: float) -> dict[str, Any]:
        record = self.bots.get(name, BotRecord())
        live = lifecycle.phase in (Phase.STARTING, Phase.RUNNING, Phase.STOPPING)
        report = record.report if live else {}
        last_error = report.get("last_error") or record.report.get("last_error")
        fatal_reason = None
        if lifecycle.phase is Phase.FATAL:
            why = last_error["text"] if isinstance(last_error, dict) else "no reason given"
            fatal_reason = f"exit {EXIT_CONFIG} (configuration or credentials refused): {why}"
        restart_in = None
        if lifecycle.phase is Phase.BACKOFF and lifecycle.restart_at is not None:
            restart_in = max(0.0, lifecycle.restart_at - monotonic_now)
        doc: dict[str, Any] = {
            "name": name,
            "state": lifecycle.phase.value,
            "pid": record.pid,
            "restarts": max(0, record.starts - 1),
            "last_exit": record.last_exit,
            "fatal_reason": fatal_reason,
            "heartbeat_age": (monotonic_now - lifecycle.last_seen) if live and lifecycle.last_seen else None,
            "restart_in": restart_in,
            "dingtalk_calls_month": lifecycle.dingtalk_calls_month,
        }
        doc.update(report)
        if live and not doc.get("connected_since"):
            doc["connected_since"] = record.connected_since
        doc["in_flight"] = lifecycle.in_flight if live else 0
        doc["last_error"] = last_error
        return doc

    def metrics(self, lifecycles: Mapping[str, BotLifecycle], names: list[str]) -> list[BotMetrics]:
        bots = []
        for name in names:
            lifecycle = lifecycles.get(name)
            if lifecycle is None:
                continue
            record = self.bots.get(name, BotRecord())
            live = lifecycle.phase in (Phase.STARTING, Phase.RUNNING, Phase.STOPPING)
            gauges = {
                "dingdifyd_answers_in_flight": float(lifecycle.in_flight if live else 0),
                "dingdifyd_card_queue_length": float(record.report.get("queued", 0) if live else 0),
                "dingdifyd_dingtalk_calls_this_month": float(lifecycle.dingtalk_calls_month),
                "dingdifyd_bot_restarts": float(max(0, record.starts - 1)),
                "dingdifyd_bot_up": 1.0 if lifecycle.phase is Phase.RUNNING else 0.0,
            }
            bots.append(BotMetrics(name, record.metrics, gauges))
        return bots
