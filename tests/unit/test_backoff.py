from __future__ import annotations

import pytest

from dingdifyd.pacing.backoff import Backoff


def no_jitter() -> float:
    return 0.5  # 2 * 0.5 - 1 == 0: the spread vanishes


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(minimum=1.0, maximum=10.0, factor=2.0, rand=no_jitter)
    assert [backoff.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_reset_starts_from_the_minimum_again() -> None:
    backoff = Backoff(minimum=0.5, maximum=30.0, rand=no_jitter)
    for _ in range(4):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.5
    assert backoff.next_delay() == 1.0


def test_jitter_spreads_each_delay_within_its_fraction() -> None:
    low = Backoff(minimum=4.0, maximum=100.0, jitter=0.25, rand=lambda: 0.0)
    high = Backoff(minimum=4.0, maximum=100.0, jitter=0.25, rand=lambda: 0.999999)
    assert low.next_delay() == pytest.approx(3.0)
    assert high.next_delay() == pytest.approx(5.0, abs=1e-4)
    assert low.next_delay() == pytest.approx(6.0)


def test_jitter_never_exceeds_the_maximum() -> None:
    backoff = Backoff(minimum=8.0, maximum=8.0, jitter=0.5, rand=lambda: 0.999)
    assert backoff.next_delay() <= 8.0


def test_many_failures_neither_overflow_nor_grow_past_the_cap() -> None:
    backoff = Backoff(minimum=1.0, maximum=60.0, factor=10.0, rand=no_jitter)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert delays[-1] == 60.0 and max(delays) == 60.0
    assert backoff.attempts == 5000  # every failure counts, however long since capped
    assert backoff.delay_for(10**6) == 60.0


def test_every_delay_counts_and_a_reset_starts_over() -> None:
    backoff = Backoff(minimum=1.0, maximum=5.0, factor=2.0, jitter=0.25, rand=no_jitter)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.attempts == 5
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_the_delay_of_any_attempt_can_be_asked_without_counting_it() -> None:
    low = Backoff(minimum=2.0, maximum=100.0, jitter=0.25, rand=lambda: 0.0)
    high = Backoff(minimum=2.0, maximum=100.0, jitter=0.25, rand=lambda: 1.0)
    assert low.delay_for(1) == pytest.approx(3.0)
    assert high.delay_for(1) == pytest.approx(5.0)
    capped = Backoff(minimum=2.0, maximum=4.0, jitter=0.25, rand=lambda: 1.0)
    assert capped.delay_for(3) == 4.0
    assert low.attempts == high.attempts == capped.attempts == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"minimum": 0.0}, {"minimum": 5.0, "maximum": 1.0}, {"factor": 0.5}, {"jitter": 1.0}, {"jitter": -0.1}],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
