from __future__ import annotations

import pytest

from dingdifyd.pacing.bucket import TokenBucket
from tests.support.clock import FakeClock


def take_when_free(bucket: TokenBucket, clock: FakeClock) -> float:
    """A caller that waits as long as the bucket says, then takes its slot; when it took it. (Rounding may leave
    the slot a hair short of ready after the wait: the caller then waits again, at least a nanosecond.)"""
    while not bucket.try_acquire():
        clock.now += max(bucket.wait_time(), 1e-9)
    return clock.now


def test_first_call_goes_at_once_and_the_next_ones_are_spaced_one_slot_apart():
    clock = FakeClock(100.0)
    bucket = TokenBucket(10.0, clock=clock)
    assert [take_when_free(bucket, clock) - 100.0 for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])


def test_a_slot_comes_back_after_one_interval():
    clock = FakeClock(100.0)
    bucket = TokenBucket(10.0, clock=clock)
    assert bucket.try_acquire() is True
    assert bucket.wait_time() == pytest.approx(0.1)
    clock.now += 0.05
    assert bucket.try_acquire() is False
    assert bucket.wait_time() == pytest.approx(0.05)
    clock.now += 10.0
    assert bucket.wait_time() == 0.0


def test_idle_time_saves_up_at_most_the_burst():
    clock = FakeClock(100.0)
    bucket = TokenBucket(5.0, burst=3.0, clock=clock)
    clock.now += 60.0
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == pytest.approx(0.2)


def test_try_acquire_does_not_go_into_debt():
    clock = FakeClock(100.0)
    bucket = TokenBucket(2.0, clock=clock)
    assert bucket.try_acquire() is True
    assert bucket.try_acquire() is False
    clock.now += 0.5
    assert bucket.try_acquire() is True


def test_no_one_second_window_gets_more_than_rate_plus_one_calls():
    """DingTalk refuses more than 20 calls/s per app and API: at 18/s with burst 1, callers that each wait as
    the bucket says must never put 20 calls into one second."""
    clock = FakeClock(100.0)
    bucket = TokenBucket(18.0, clock=clock)
    send_times = [take_when_free(bucket, clock) for _ in range(100)]
    for i, first in enumerate(send_times):
        in_window = [t for t in send_times[i:] if t <= first + 1.0 + 1e-9]
        assert len(in_window) <= 19


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (-1.0, 1.0), (5.0, 0.5)])
def test_bucket_rejects_nonsense(rate: float, burst: float):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst=burst)
