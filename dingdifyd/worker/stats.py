"""What a bot process tells the supervisor about itself: live state for `dingdifyd status`, and its metrics.

The bot process feeds a `BotStats` from the places things happen (connection changes, answers ending, DingTalk
calls, store failures, log lines at WARNING and above) and sends `report()` up its pipe with every heartbeat.
Everything in it is safe to show: ids, counts, times and log lines (which carry neither secrets nor message
text at WARNING).

Answers per day are counted in the bot's store (like its DingTalk calls), so a restart does not reset today's
figures; a store that cannot count leaves them to this process's own tally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dingdifyd.bridge.report import AnswerReport
from dingdifyd.logs.setup import redact
from dingdifyd.metrics import Recorder, call_result, dify_error_kind

log = logging.getLogger(__name__)

LAST_ERROR_CHARS = 300
DAY_KEY_TTL = 3 * 24 * 3600.0
# Dify failures that say it could not be reached (rather than that it answered with an error)
_UNREACHABLE_KINDS = ("timeout", "unavailable")


class BotStats:
    def __init__(self, *, store: Any = None, now: Callable[[], float] = time.time):
        self._store = store if store is not None and hasattr(store, "incr") else None
        self._now = now
        self.metrics = Recorder()
        self.started_at = now()
        self.connected_since: float | None = None
        self.connects = 0
        self.last_error: tuple[float, str] | None = None
        self.dify: dict[str, Any] = {"state": "unknown", "at": None, "detail": "no answer yet"}
        self._day = ""
        self.today = {"answered": 0, "failed": 0}
        self._last_calls: dict[str, int] = {}
        self._roll()

    # --- what happened -----------------------------------------------------------------------------------

    def connection(self, state: str) -> None:
        if state == "connected":
            self.connects += 1
            self.connected_since = self._now()
        elif state == "disconnected":
            self.connected_since = None

    def answer(self, report: AnswerReport) -> None:
        self.metrics.count("dingdifyd_answers", outcome=report.outcome)
        if report.outcome == "refused":
            return
        if report.first_text_seconds is not None:
            self.metrics.observe("dingdifyd_answer_first_text_seconds", report.first_text_seconds)
        if report.outcome == "answered":
            self.metrics.observe("dingdifyd_answer_seconds", report.seconds)
        kind = dify_error_kind(report.error) if report.error is not None else None
        if kind is not None:
            self.metrics.count("dingdifyd_dify_errors", kind=kind)
            unreachable = kind in _UNREACHABLE_KINDS and not report.dify_answered
            state = "unreachable" if unreachable else "erroring"
            self.dify = {"state": state, "at": self._now(), "detail": type(report.error).__name__}
        elif report.dify_answered:
            self.dify = {"state": "reachable", "at": self._now(), "detail": "answered"}
        if report.outcome in self.today:
            self._tally(report.outcome)

    def dingtalk_call(self, api: str, status: int | None, code: str) -> None:
        self.metrics.count("dingdifyd_dingtalk_calls", api=api, result=call_result(status, code))

    def store_error(self) -> None:
        self.metrics.count("dingdifyd_store_errors")

    def problem(self, record: logging.LogRecord) -> None:
        text = redact(record.getMessage()).splitlines()[0] if record.getMessage() else record.levelname
        self.last_error = (record.created, text[:LAST_ERROR_CHARS])

    # --- the report ----------------------------------------------------------------------------------------

    def attach_store(self, store: Any) -> None:
        """The bot's store, once open: today's answers are counted there."""
        self._store = store if hasattr(store, "incr") else None
        self._day = ""
        self._roll()

    def report(self, *, in_flight: int = 0, queued: int = 0, calls: dict[str, int] | None = None,
               budget: int | None = None, pacing: str = "normal") -> dict[str, Any]:  # fmt: skip
        """The heartbeat's stats: small (it goes up a pipe every few seconds), JSON-able, nothing secret."""
        calls = calls if calls is not None else self._last_calls
        self._last_calls = calls
        self._roll()
        last_error = {"at": self.last_error[0], "text": self.last_error[1]} if self.last_error else None
        return {
            "dingtalk_calls_today": calls.get("dingtalk_calls_today", 0),
            "dingtalk_calls_month": calls.get("dingtalk_calls_month", 0),
            "status": {
                "process_started": self.started_at,
                "connected_since": self.connected_since,
                "reconnects": max(0, self.connects - 1),
                "in_flight": in_flight,
                "queued": queued,
                "answered_today": self.today["answered"],
                "failed_today": self.today["failed"],
                "dingtalk_calls_today": calls.get("dingtalk_calls_today", 0),
                "dingtalk_calls_month": calls.get("dingtalk_calls_month", 0),
                "dingtalk_monthly_budget": budget,
                "pacing": pacing,
                "last_error": last_error,
                "dify": dict(self.dify),
            },
            "metrics": self.metrics.snapshot(),
        }

    # --- per-day counts ------------------------------------------------------------------------------------

    def _roll(self) -> None:
        day = datetime.fromtimestamp(self._now()).strftime("%Y-%m-%d")
        if day == self._day:
            return
        self._day = day
        self.today = {outcome: self._read(outcome) for outcome in self.today}

    def _key(self, outcome: str) -> str:
        return f"answers/day/{self._day}/{outcome}"

    def _read(self, outcome: str) -> int:
        if self._store is None:
            return 0
        try:
            return int(self._store.counter(self._key(outcome)))
        except Exception:
            log.warning("reading today's %s count from the store failed", outcome)
            return 0

    def _tally(self, outcome: str) -> None:
        self._roll()
        if self._store is not None:
            try:
                self.today[outcome] = int(self._store.incr(self._key(outcome), 1, DAY_KEY_TTL))
                return
            except Exception:
                log.warning("counting an %s answer in the store failed", outcome)
        self.today[outcome] += 1


class ProblemRecorder(logging.Handler):
    """Keeps the bot process's latest line at WARNING or above: `status`'s "last error"."""

    def __init__(self, stats: BotStats):
        super().__init__(logging.WARNING)
        self.stats = stats

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stats.problem(record)
        except Exception:
            self.handleError(record)


class ErrorCountingStore:
    """The bot's store, with every failed call counted (then raised as before). A Redis store, which handles
    its own failures (it answers without shared state until the server is back), reports them itself."""

    def __init__(self, store: Any, on_error: Callable[[], None]):
        self._store = store
        self._on_error = on_error
        # a store that reports its own failures (Redis: also those it answers without raising) is not counted
        # twice here
        self._counts_itself = hasattr(store, "on_error")
        if self._counts_itself:
            store.on_error = on_error

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except Exception:
                if not self._counts_itself:
                    self._on_error()
                raise

        return counted
