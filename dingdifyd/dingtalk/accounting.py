"""DingTalk API call accounting, and the monthly budget that paces card updates.

DingTalk's standard edition allows an organisation 5000 OpenAPI calls a month (token calls excluded), and every
card update is one. Each call the bot makes is counted per day and per month in the bot's store (a restart keeps
the counts), and `pacing()` turns the counts into how freely cards may be updated under the optional
`dingtalk_api_monthly_budget`: the remaining budget is spread over the remaining days of the month; as a day's
share is used up the update interval widens (x2 at half the share, x4 at three quarters); once the share is used,
or the month's budget is nearly used, a card gets only its first text and its final answer; once the budget is
used, only the final answer. `budget_pacing` is that arithmetic, pure.
"""

from __future__ import annotations

import calendar
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from dingdifyd.errors import StoreUnavailable
from dingdifyd.pacing.scheduler import NORMAL_PACING, Pacing

log = logging.getLogger(__name__)

NEARLY_USED = 0.05  # the last 5 % of the monthly budget is kept for first texts and final answers
MAX_INTERVAL_FACTOR = 20.0
DAY_KEY_TTL = 3 * 24 * 3600.0
MONTH_KEY_TTL = 62 * 24 * 3600.0
# Counts go to the store in batches: a store write per call was the largest cost of a busy bot's card calls.
# A crash loses at most this many seconds' or calls' worth of counts.
FLUSH_EVERY = 5.0
FLUSH_AT = 100


def budget_pacing(*, budget: int, used_month: int, used_today: int, day: int, days_in_month: int) -> Pacing:
    """How freely to update cards with `budget` calls a month, `used_month` of them used (`used_today` today,
    which is day `day` of a month of `days_in_month` days)."""
    remaining = budget - used_month
    if remaining <= 0:
        return Pacing("final-only", first_text=False, intermediate=False)
    if remaining <= budget * NEARLY_USED:
        return Pacing("essential", intermediate=False)
    days_left = max(1, days_in_month - day + 1)  # today included
    todays_share = (remaining + used_today) / days_left  # what remained this morning, spread evenly
    spent = used_today / todays_share
    if spent >= 1.0:
        return Pacing("essential", intermediate=False)
    factor = min(MAX_INTERVAL_FACTOR, 1.0 / (1.0 - spent))
    return Pacing("widened" if factor >= 1.5 else "normal", interval_factor=factor)


class CounterStore(Protocol):
    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int: ...
    def counter(self, key: str) -> int: ...


class ApiAccounting:
    """Counts a bot's DingTalk calls (the DingTalkApi's `on_call`) and derives the card pacing from them."""

    def __init__(
        self,
        store: CounterStore | None,
        *,
        monthly_budget: int | None = None,
        now: Callable[[], datetime] = datetime.now,
    ):
        if store is not None and not (hasattr(store, "incr") and hasattr(store, "counter")):
            log.warning("this store keeps no counters: DingTalk calls are counted from the bot's start only")
            store = None
        self._store = store
        self.monthly_budget = monthly_budget
        self._now = now
        self._day = ""
        self._month = ""
        self._date: object = None
        self._unsaved = 0
        self._flushed_at = now()
        self.today = 0
        self.month = 0
        self._pacing = NORMAL_PACING
        self._roll(now())
        log.info("DingTalk calls so far: %d today, %d this month%s", self.today, self.month, self._budget_note())

    @staticmethod
    def _keys(moment: datetime) -> tuple[str, str]:
        return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")

    def _roll(self, moment: datetime) -> None:
        """Start counting a new day (and month) when the date changed; load what the store already has."""
        if moment.date() == self._date:
            return
        self.flush()  # what is unsaved belongs to the day that ended
        self._date = moment.date()
        day, month = self._keys(moment)
        if self._day:
            log.info("DingTalk calls on %s: %d; %d this month so far", self._day, self.today, self.month)
        self._day, self._month = day, month
        self.today = self._read(f"dingtalk-calls/day/{day}")
        self.month = self._read(f"dingtalk-calls/month/{month}")
        self._update_pacing(moment)

    def _read(self, key: str) -> int:
        if self._store is None:
            return 0
        try:
            return int(self._store.counter(key))
        except StoreUnavailable:
            return 0  # the store said so once; the count starts from here
        except Exception:
            log.exception("reading the DingTalk call counter %s failed", key)
            return 0

    def record(self, api: str) -> None:
        """One call of `api` reached DingTalk."""
        moment = self._now()
        self._roll(moment)
        self.today += 1
        self.month += 1
        self._unsaved += 1
        if self._unsaved >= FLUSH_AT or (moment - self._flushed_at).total_seconds() >= FLUSH_EVERY:
            self.flush(moment)
        self._update_pacing(moment)

    def flush(self, moment: datetime | None = None) -> None:
        """Add the calls counted since the last flush to the store (shared with other hosts with Redis, whose
        totals come back); also called when the bot stops."""
        self._flushed_at = moment or self._now()
        if self._store is None or not self._unsaved:
            return
        unsaved, self._unsaved = self._unsaved, 0
        try:
            self.today = self._store.incr(f"dingtalk-calls/day/{self._day}", unsaved, DAY_KEY_TTL)
            self.month = self._store.incr(f"dingtalk-calls/month/{self._month}", unsaved, MONTH_KEY_TTL)
        except StoreUnavailable:
            self._unsaved += unsaved  # the store said so once; these calls are counted at a later flush
        except Exception:
            log.exception("counting DingTalk calls in the store failed")

    def pacing(self) -> Pacing:
        return self._pacing

    def stats(self) -> dict[str, int]:
        """What the bot process reports to the supervisor with its heartbeats."""
        return {"dingtalk_calls_today": self.today, "dingtalk_calls_month": self.month}

    def _update_pacing(self, moment: datetime) -> None:
        if self.monthly_budget is None:
            return
        pacing = budget_pacing(
            budget=self.monthly_budget, used_month=self.month, used_today=self.today, day=moment.day,
            days_in_month=calendar.monthrange(moment.year, moment.month)[1],
        )  # fmt: skip
        if pacing.level != self._pacing.level:
            level = logging.WARNING if pacing.level in ("essential", "final-only") else logging.INFO
            log.log(level, "card updates: %s%s", self._explain(pacing), self._budget_note())
        self._pacing = pacing

    def _budget_note(self) -> str:
        if self.monthly_budget is None:
            return ""
        return f" (budget {self.monthly_budget} a month, {max(0, self.monthly_budget - self.month)} left)"

    def _explain(self, pacing: Pacing) -> str:
        if pacing.level == "final-only":
            return "the monthly budget is used up; cards get only their final answer"
        if pacing.level == "essential":
            nearly = self.monthly_budget is not None and self.month >= self.monthly_budget * (1 - NEARLY_USED)
            why = "the monthly budget is nearly used" if nearly else "today's share of the monthly budget is used"
            return f"{why}; cards get only their first text and final answer"
        if pacing.level == "widened":
            return f"intervals widened x{pacing.interval_factor:.1f} to spread the monthly budget over the month"
        return "back to the configured interval"
