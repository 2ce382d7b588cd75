from __future__ import annotations

import pytest

from dingdifyd.pacing.bucket import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_call_goes_at_once_and_the_next_ones_are_spaced_one_slot_apart():
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(0.1)
    assert bucket.reserve() == pytest.approx(0.2)


def test_waiting_pays_back_the_debt():
    clock = FakeClock()
    bucket = TokenBucket(10.0, clock=clock)
    for _ in range(3):
        bucket.reserve()
    clock.now += 0.2
    assert bucket.reserve() == pytest.approx(0.1)
    clock.now += 10.0
    assert bucket.reserve() == 0.0


def test_idle_time_saves_up_at_most_the_burst():
    clock = FakeClock()
    bucket = TokenBucket(5.0, burst=3.0, clock=clock)
    clock.now += 60.0
    delays = [bucket.reserve() for _ in range(5)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert delays[3] == pytest.approx(0.2)
    assert delays[4] == pytest.approx(0.4)


def test_try_acquire_does_not_go_into_debt():
    clock = FakeClock()
    bucket = TokenBucket(2.0, clock=clock)
    assert bucket.try_acquire() is True
    assert bucket.try_acquire() is False
    clock.now += 0.5
    assert bucket.try_acquire() is True


def test_no_one_second_window_gets_more_than_rate_plus_one_calls():
    """DingTalk refuses more than 20 calls/s per app and API: at 18/s with burst 1 a burst of 100 callers
    must never put 20 calls into one second."""
    clock = FakeClock()
    bucket = TokenBucket(18.0, clock=clock)
    start = clock.now
    send_times = sorted(start + bucket.reserve() for _ in range(100))
    for i, first in enumerate(send_times):
        in_window = [t for t in send_times[i:] if t <= first + 1.0 + 1e-9]
        assert len(in_window) <= 19


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1.0), (-1.0, 1.0), (5.0, 0.5)])
def test_bucket_rejects_nonsense(rate: float, burst: float):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst=burst)
