"""The late-delivery warning (dingdifyd.worker.delivery_watch), with a hand-driven clock."""

from __future__ import annotations

import logging

from dingdifyd.models import IncomingMessage
from dingdifyd.worker.delivery_watch import DeliveryWatch
from tests.support.clock import FakeClock


def written_at(seconds: float, msg_id: str = "m") -> IncomingMessage:
    return IncomingMessage("robot", msg_id, "text", "hi", "cid", "1", "sender", created_at_ms=int(seconds * 1000))


def test_a_message_written_while_connected_and_delivered_much_later_is_warned_about(caplog):
    caplog.set_level(logging.INFO)
    clock = FakeClock(1_000_000.0)
    watch = DeliveryWatch("dingapp", late_after=20, wall_clock=clock)
    watch.connected()
    clock.now += 100
    assert not watch.observe(written_at(clock.now - 1))  # normal latency
    assert watch.observe(written_at(clock.now - 61, "stolen"))  # another connection had it for a minute
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "stolen" in warning.getMessage() and "dingapp" in warning.getMessage()
    assert "another connection" in warning.getMessage()


def test_messages_kept_for_us_while_we_were_away_are_not_suspicious(caplog):
    clock = FakeClock(1_000_000.0)
    watch = DeliveryWatch("dingapp", late_after=20, wall_clock=clock)
    assert not watch.observe(written_at(clock.now - 300))  # not connected at all
    watch.connected()
    clock.now += 5
    assert not watch.observe(written_at(clock.now - 120))  # written before this connection existed
    watch.disconnected()
    assert not watch.observe(written_at(clock.now - 1))
    assert not watch.observe(IncomingMessage("robot", "m", "text", "hi", "cid", "1", "s"))  # no createAt
    assert watch.late_deliveries == 0


def test_the_warning_is_rate_limited_and_counts_what_it_held_back(caplog):
    caplog.set_level(logging.WARNING)
    clock = FakeClock(1_000_000.0)
    watch = DeliveryWatch("dingapp", late_after=20, warn_every=600, wall_clock=clock)
    watch.connected()
    for _ in range(5):
        clock.now += 100
        watch.observe(written_at(clock.now - 60))
    assert len(caplog.records) == 1
    clock.now += 700
    watch.observe(written_at(clock.now - 60))
    assert len(caplog.records) == 2
    assert "(4 more since the last warning)" in caplog.records[1].getMessage()
    assert watch.late_deliveries == 6
