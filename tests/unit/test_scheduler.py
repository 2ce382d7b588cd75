"""The card-call scheduler's policy with an injected clock: which card goes next, and when."""

from __future__ import annotations

from collections import deque

import pytest

from dingdifyd.pacing.scheduler import CREATE, WRITE, Priority, SchedulePolicy, TurnOutcome
from tests.support.clock import FakeClock


def policy(clock: FakeClock, qps: float | None = 10.0, **kwargs) -> SchedulePolicy:
    # rng 0.5: jitter-free back-off, so the holds are exact
    return SchedulePolicy(qps=qps, clock=clock, rng=lambda: 0.5, **kwargs)


def drain(p: SchedulePolicy) -> list[object]:
    """Everything granted right now, each turn ended at once."""
    granted = []
    while (card := p.poll()) is not None:
        granted.append(card)
        p.finished(card, TurnOutcome.OK)
    return granted


def test_the_first_call_goes_at_once_and_the_next_waits_for_the_bucket():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=10.0)
    p.request("a", Priority.FIRST)
    p.request("b", Priority.FIRST)
    assert p.poll() == "a"
    assert p.poll() is None
    assert p.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    assert p.poll() == "b"
    assert p.wait_time() is None  # nobody else waits


def test_card_creations_have_a_bucket_of_their_own_beside_the_writes():
    # DingTalk limits each API separately: a burst of new cards must not take the turns of open cards' texts
    clock = FakeClock(1000.0)
    p = policy(clock, qps=10.0)
    p.request("new-1", Priority.FIRST, api=CREATE)
    p.request("new-2", Priority.FIRST, api=CREATE)
    p.request("open-card", Priority.UPDATE, api=WRITE)
    assert drain(p) == ["new-1", "open-card"]  # one of each API, not two creations
    assert p.wait_time() == pytest.approx(0.1)
    clock.now += 0.1
    assert drain(p) == ["new-2"]


def test_final_answers_go_before_first_texts_and_first_texts_before_updates():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None)
    p.request("update", Priority.UPDATE)
    clock.now += 1
    p.request("first", Priority.FIRST)
    clock.now += 1
    p.request("final", Priority.FINAL)
    assert drain(p) == ["final", "first", "update"]


def test_equal_priorities_take_turns_the_longest_ready_first():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None)
    for card in "abc":
        p.request(card, Priority.UPDATE)
        clock.now += 0.01
    order = []
    for _ in range(6):
        card = p.poll()
        assert card is not None
        order.append(card)
        p.finished(card, TurnOutcome.OK)
        p.request(card, Priority.UPDATE)  # it has more text: it queues again, behind the others
        clock.now += 0.01
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_readiness_counts_from_when_a_card_became_ready_not_when_it_asked():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None)
    p.request("early-asker", Priority.UPDATE, ready_at=clock.now + 0.5)  # its interval has not passed
    clock.now += 0.2
    p.request("ready-now", Priority.UPDATE)
    clock.now += 0.5
    assert drain(p) == ["ready-now", "early-asker"]


def test_a_card_is_not_served_before_its_time():
    clock = FakeClock(1000.0)
    p = policy(clock)
    p.request("a", Priority.UPDATE, ready_at=clock.now + 0.3)
    assert p.poll() is None
    assert p.wait_time() == pytest.approx(0.3)
    clock.now += 0.3
    assert p.poll() == "a"


def test_asking_again_updates_the_request_and_keeps_its_place():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None)
    assert p.request("a", Priority.UPDATE)
    assert not p.request("a", Priority.UPDATE, ready_at=clock.now)  # nothing changed
    clock.now += 0.1
    p.request("b", Priority.FINAL)
    assert p.request("a", Priority.FINAL)  # the answer ended before its update went out: one final call
    assert len(p) == 2
    assert drain(p) == ["a", "b"]  # same priority now, and "a" has waited longer


def test_one_call_in_flight_per_card():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None)
    p.request("a", Priority.UPDATE)
    assert p.poll() == "a"
    p.request("a", Priority.FINAL)  # asked while its update is still in flight
    assert p.poll() is None
    assert p.wait_time() is None  # nothing to wait for but the call's end
    p.finished("a", TurnOutcome.OK)
    assert p.poll() == "a"


def test_a_rate_limit_refusal_holds_the_whole_app_and_the_card_keeps_its_place():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None, hold_base=1.0)
    p.request("refused", Priority.UPDATE)
    assert p.poll() == "refused"
    clock.now += 0.05
    p.request("later", Priority.UPDATE)
    p.request("refused", Priority.UPDATE)  # it asks again with its newest text
    assert p.finished("refused", TurnOutcome.RATE_LIMITED) == pytest.approx(1.0)
    assert p.poll() is None
    assert p.wait_time() == pytest.approx(1.0)
    clock.now += 1.0
    assert drain(p) == ["refused", "later"]


def test_holds_grow_while_refusals_go_on_and_reset_after_a_success():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None, hold_base=1.0, hold_cap=2.0)
    holds = []
    for _ in range(4):
        p.request("a", Priority.FINAL)
        clock.now = p.holding_until if p.holding_until > clock.now else clock.now
        assert p.poll() == "a"
        holds.append(p.finished("a", TurnOutcome.RATE_LIMITED))
    assert holds == pytest.approx([1.0, 1.5, 2.0, 2.0])
    clock.now = p.holding_until
    p.request("a", Priority.FINAL)
    assert p.poll() == "a"
    p.finished("a", TurnOutcome.OK)
    p.request("a", Priority.FINAL)
    assert p.poll() == "a"
    assert p.finished("a", TurnOutcome.RATE_LIMITED) == pytest.approx(1.0)


def test_other_failures_do_not_hold_the_app():
    clock = FakeClock(1000.0)
    p = policy(clock, qps=None)
    p.request("a", Priority.FINAL)
    p.request("b", Priority.FINAL)
    assert p.poll() == "a"
    assert p.finished("a", TurnOutcome.FAILED) == 0.0
    assert p.poll() == "b"


def test_retry_back_off_doubles_per_attempt():
    p = policy(FakeClock(1000.0), retry_base=0.5, retry_cap=8.0)
    assert [p.retry_delay(n) for n in range(1, 7)] == pytest.approx([0.5, 1, 2, 4, 8, 8])


def test_cancelled_requests_are_not_served():
    clock = FakeClock(1000.0)
    p = policy(clock)
    p.request("a", Priority.UPDATE)
    p.cancel("a")
    assert not p.pending("a")
    assert p.poll() is None and p.wait_time() is None


@pytest.mark.parametrize("qps", [18.0, 5.0])
def test_any_one_second_window_sees_at_most_qps_plus_one_calls(qps: float):
    """Many busy cards for five simulated seconds: the rate the server sees stays under its limit."""
    clock = FakeClock(1000.0)
    p = policy(clock, qps=qps)
    for card in range(60):
        p.request(card, Priority.UPDATE if card % 3 else Priority.FIRST)
    granted: list[float] = []
    end = clock.now + 5.0
    while clock.now < end:
        card = p.poll()
        if card is None:
            clock.now += max(p.wait_time() or 0.001, 1e-6)
            continue
        granted.append(clock.now)
        p.finished(card, TurnOutcome.OK)
        p.request(card, Priority.UPDATE)
    window: deque[float] = deque()
    worst = 0
    for at in granted:
        window.append(at)
        while window[0] <= at - 1.0:
            window.popleft()
        worst = max(worst, len(window))
    assert worst <= qps + 1
    assert len(granted) >= 5 * qps  # and the bucket is not stingy either
