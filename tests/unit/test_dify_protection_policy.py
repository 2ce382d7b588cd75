"""The pure parts of protecting a Dify from bursts: the fair queue, the circuit breaker, which failures count."""

from __future__ import annotations

import pytest

from dingdifyd.dify.overload import is_overload, retry_delay, worth_retrying
from dingdifyd.errors import (
    ConversationNotFound,
    DifyAuthError,
    DifyError,
    DifyRateLimited,
    DifyStreamCut,
    DifyTimeout,
    DifyTotalTimeout,
    DifyUnavailable,
)
from dingdifyd.pacing.circuit import CircuitBreaker, CircuitSettings, CircuitState
from dingdifyd.pacing.fairqueue import FairQueue
from tests.support.clock import FakeClock

# --- the fair queue ----------------------------------------------------------------------------------------


def test_the_oldest_waits_least_and_people_take_turns():
    queue: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3", "a4"):
        queue.add("alice", item)  # alice floods
    queue.add("bob", "b1")
    queue.add("carol", "c1")
    queue.add("bob", "b2")
    assert list(queue.order()) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert queue.places() == {"a1": 0, "b1": 1, "c1": 2, "a2": 3, "b2": 4, "a3": 5, "a4": 6}
    taken = [queue.pop() for _ in range(len(queue))]
    assert taken == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]  # what order() promised
    assert queue.pop() is None and queue.head() is None


def test_a_newcomer_waits_for_one_answer_of_each_person_ahead_not_for_a_flood():
    queue: FairQueue[str] = FairQueue()
    for index in range(50):
        queue.add("flood", f"f{index}")
    queue.add("newcomer", "n1")
    assert queue.places()["n1"] == 1


def test_an_answer_given_up_leaves_the_queue():
    queue: FairQueue[str] = FairQueue()
    queue.add("alice", "a1")
    queue.add("bob", "b1")
    assert queue.remove("a1") and not queue.remove("a1")
    assert queue.head() == "b1" and len(queue) == 1


# --- the circuit breaker -----------------------------------------------------------------------------------


SETTINGS = CircuitSettings(window=10, window_seconds=60, min_requests=4, failure_ratio=0.5, open_for=10,
                           max_open_for=40)  # fmt: skip


def test_most_recent_failures_open_the_circuit_and_a_probe_closes_it():
    clock = FakeClock(100.0)
    circuit = CircuitBreaker(SETTINGS, clock=clock)
    for failed in (False, True, True):
        assert circuit.allow()
        circuit.record(failed)
    assert circuit.state is CircuitState.CLOSED  # three requests: too few to judge
    assert circuit.allow()
    assert circuit.record(True) is CircuitState.OPEN  # 3 of 4 failed
    assert not circuit.allow() and circuit.retry_after() == 10
    clock.now += 10
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # only one
    assert circuit.record(False) is CircuitState.CLOSED
    assert circuit.allow() and circuit.allow()


def test_a_failed_probe_opens_for_longer_up_to_a_bound():
    clock = FakeClock(100.0)
    circuit = CircuitBreaker(SETTINGS, clock=clock)
    for _ in range(4):
        circuit.allow()
        circuit.record(True)
    cool_downs = []
    for _ in range(4):
        cool_downs.append(circuit.retry_after())
        clock.now += circuit.retry_after()
        assert circuit.allow()
        circuit.record(True)
    assert cool_downs == [10, 20, 40, 40]


def test_a_probe_that_ends_without_an_outcome_lets_the_next_one_probe():
    clock = FakeClock(100.0)
    circuit = CircuitBreaker(SETTINGS, clock=clock)
    for _ in range(4):
        circuit.allow()
        circuit.record(True)
    clock.now += 10
    assert circuit.allow() and not circuit.allow()
    circuit.abandon_probe()
    assert circuit.allow()


def test_old_failures_do_not_count():
    clock = FakeClock(100.0)
    circuit = CircuitBreaker(SETTINGS, clock=clock)
    for _ in range(3):
        circuit.record(True)
    clock.now += 61
    for _ in range(3):
        circuit.record(False)
    circuit.record(True)
    assert circuit.state is CircuitState.CLOSED  # 1 of the 4 recent ones failed


# --- which failures count ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "overload", "retry"),
    [
        (DifyError("internal", status=500, code="internal_server_error"), True, True),
        (DifyError("bad gateway", status=502), True, True),
        (DifyUnavailable("connection refused"), True, True),
        (DifyStreamCut("reset"), True, True),
        (DifyError("(psycopg2) QueuePool limit of size 30 overflow 10 reached, connection timed out"), True, True),
        (DifyTimeout("no response headers within 60 s"), True, False),  # it may be running: not asked twice
        (DifyTotalTimeout("too long"), False, False),
        (DifyError("invalid_param", status=400, code="invalid_param"), False, False),
        (ConversationNotFound("Conversation Not Exists.", status=404, code="not_found"), False, False),
        (DifyAuthError("refused", status=401), False, False),
        (DifyRateLimited("too many", status=429, code="too_many_requests"), False, False),
        (DifyError("[openai] Error: quota", code="completion_request_error"), False, False),
    ],
)
def test_which_failures_mean_dify_is_not_coping(error, overload, retry):
    assert is_overload(error) is overload
    assert worth_retrying(error) is retry


def test_the_retry_pause_is_short_and_spread():
    assert retry_delay(lambda: 0.0) == 0.5 and retry_delay(lambda: 1.0) == 1.5
