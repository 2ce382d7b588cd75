"""DingTalk call accounting: the budget arithmetic, counters kept in the store across restarts, and the report
to the supervisor (heartbeat payload, STATUS= text)."""

from __future__ import annotations

import multiprocessing
import time
from datetime import datetime

import pytest

from dingdifyd.dingtalk.accounting import FLUSH_AT, ApiAccounting, budget_pacing
from dingdifyd.pacing.backoff import Backoff
from dingdifyd.store.disk import DiskStore
from dingdifyd.supervisor.state import BotLifecycle, status_text, summarize
from dingdifyd.worker.heartbeat import ParentChannel

# --- the arithmetic ----------------------------------------------------------------------------------------


def pacing(**kwargs):
    values = {"budget": 3000, "used_month": 0, "used_today": 0, "day": 1, "days_in_month": 30} | kwargs
    return budget_pacing(**values)


def test_a_fresh_budget_updates_at_the_configured_interval():
    fresh = pacing()
    assert fresh.level == "normal"
    assert fresh.interval_factor == 1.0
    assert fresh.first_text and fresh.intermediate


def test_the_remaining_budget_is_spread_over_the_remaining_days_and_intervals_widen_as_a_day_uses_its_share():
    # 3000 left on the 1st of a 30-day month: 100 a day
    assert pacing(used_month=50, used_today=50).interval_factor == pytest.approx(2.0)  # half the share used
    assert pacing(used_month=75, used_today=75).interval_factor == pytest.approx(4.0)
    assert pacing(used_month=75, used_today=75).level == "widened"
    # the same day's use weighs more when less is left for the rest of the month
    late = pacing(budget=3000, used_month=2900, used_today=50, day=30)
    assert late.level == "essential" or late.interval_factor > 2.0


def test_once_the_days_share_is_used_only_first_texts_and_final_answers():
    spent = pacing(used_month=100, used_today=100)
    assert spent.level == "essential"
    assert spent.first_text and not spent.intermediate
    tomorrow = pacing(used_month=100, used_today=0, day=2)  # 2900 over 29 days: 100 again
    assert tomorrow.level == "normal"


def test_a_nearly_used_budget_keeps_the_rest_for_first_texts_and_final_answers():
    nearly = pacing(budget=5000, used_month=4760, used_today=0, day=29)
    assert nearly.level == "essential" and nearly.first_text and not nearly.intermediate


def test_a_used_budget_leaves_only_the_final_answer():
    for used in (5000, 6000):
        gone = pacing(budget=5000, used_month=used, used_today=0, day=20)
        assert gone.level == "final-only"
        assert not gone.first_text and not gone.intermediate


def test_the_widening_is_capped():
    assert pacing(used_month=99, used_today=99).interval_factor <= 20.0


# --- counting ----------------------------------------------------------------------------------------------


class Calendar:
    def __init__(self, moment: datetime):
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


def test_counts_per_day_and_month_survive_a_restart(tmp_path):
    when = Calendar(datetime(2026, 3, 14, 10, 0))
    store = DiskStore(tmp_path)
    accounting = ApiAccounting(store, now=when)
    for api in ("card.createAndDeliver", "card.streaming", "card.streaming"):
        accounting.record(api)
    assert (accounting.today, accounting.month) == (3, 3)
    accounting.flush()  # the bot process stopping
    store.close()
    store = DiskStore(tmp_path)  # a new process on the same state directory
    again = ApiAccounting(store, now=when)
    assert again.stats() == {"dingtalk_calls_today": 3, "dingtalk_calls_month": 3}
    when.moment = datetime(2026, 3, 15, 0, 1)  # a new day: today restarts, the month goes on
    again.record("card.streaming")
    assert (again.today, again.month) == (1, 4)
    when.moment = datetime(2026, 4, 1, 0, 1)  # a new month
    again.record("card.streaming")
    assert (again.today, again.month) == (1, 1)
    store.close()


def test_counts_reach_the_store_in_batches_by_time_and_by_number(tmp_path):
    when = Calendar(datetime(2026, 3, 14, 10, 0))
    store = DiskStore(tmp_path)
    accounting = ApiAccounting(store, now=when)
    accounting.record("card.streaming")
    assert store.counter("dingtalk-calls/day/2026-03-14") == 0  # not one store write per call
    when.moment = datetime(2026, 3, 14, 10, 0, 6)  # FLUSH_EVERY later
    accounting.record("card.streaming")
    assert store.counter("dingtalk-calls/day/2026-03-14") == 2
    for _ in range(FLUSH_AT):
        accounting.record("card.streaming")
    assert store.counter("dingtalk-calls/day/2026-03-14") == 2 + FLUSH_AT
    when.moment = datetime(2026, 3, 15, 0, 0)  # the day ends: its last calls are saved under it
    accounting.record("card.streaming")
    assert store.counter("dingtalk-calls/day/2026-03-14") == 2 + FLUSH_AT
    assert accounting.today == 1
    store.close()


def test_counters_in_the_store_expire_and_count_atomically(tmp_path):
    store = DiskStore(tmp_path)
    assert store.counter("x") == 0
    assert store.incr("x", 2, expire=3600) == 2
    assert store.incr("x", 3, expire=3600) == 5
    assert store.counter("x") == 5
    # the expiry is set by the first increment and kept by the later ones (diskcache's incr alone sets none)
    _, expires_at = store._main.get(("count", "x"), expire_time=True)
    assert expires_at is not None and expires_at - time.time() == pytest.approx(3600, abs=60)
    store.close()


def test_the_budget_paces_from_the_counts(tmp_path):
    when = Calendar(datetime(2026, 2, 1, 9, 0))  # 28 days
    accounting = ApiAccounting(None, monthly_budget=280, now=when)
    assert accounting.pacing().level == "normal"
    for _ in range(5):
        accounting.record("card.streaming")
    assert accounting.pacing().interval_factor == pytest.approx(2.0)  # half of today's 10
    for _ in range(5):
        accounting.record("card.streaming")
    assert accounting.pacing().level == "essential"


def test_without_a_budget_nothing_is_paced(tmp_path):
    accounting = ApiAccounting(None, now=Calendar(datetime(2026, 2, 1)))
    for _ in range(10_000):
        accounting.record("card.streaming")
    assert accounting.pacing().level == "normal"
    assert accounting.month == 10_000


# --- reporting to the supervisor ---------------------------------------------------------------------------


def test_heartbeats_carry_the_counts_and_status_shows_the_months_calls():
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    try:
        channel = ParentChannel(writer)
        channel.heartbeat(2, {"dingtalk_calls_month": 1234, "dingtalk_calls_today": 56})
        channel.heartbeat(1)  # the old shape still works
        with_stats, plain = reader.recv(), reader.recv()
    finally:
        reader.close()
        writer.close()
    assert with_stats == ("heartbeat", 2, {"dingtalk_calls_month": 1234, "dingtalk_calls_today": 56})
    assert plain == ("heartbeat", 1)
    now = [0.0]
    bots = [BotLifecycle(name, clock=lambda: now[0], backoff=Backoff(1.0, 60.0), heartbeat_timeout=30.0,
                         kill_grace=5.0) for name in ("a", "b")]
    for lifecycle in bots:
        lifecycle.start()
        lifecycle.spawned()
        lifecycle.connected()
    bots[0].heartbeat(*with_stats[1:])
    bots[1].heartbeat(*plain[1:])
    text = status_text(summarize(bots, now[0]))
    assert text.endswith("; 3 conversations in flight; 1234 DingTalk calls this month")
    bots[0].heartbeat(0, {"dingtalk_calls_month": "garbage"})  # ignored, the last good count stays
    assert bots[0].dingtalk_calls_month == 1234
