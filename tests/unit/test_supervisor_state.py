"""The per-bot restart state machine, driven by an injected clock: no processes, no sleeping."""

from __future__ import annotations

import signal

import pytest

from dingdifyd.errors import EX_CONFIG
from dingdifyd.pacing.backoff import Backoff
from dingdifyd.supervisor.state import (
    BotLifecycle,
    Kill,
    Phase,
    ScheduleSpawn,
    Spawn,
    StopIntent,
    Summary,
    Terminate,
    all_fatal,
    all_settled,
    healthy,
    ready_due,
    status_text,
    summarize,
)
from tests.support.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def lifecycle(clock: FakeClock, name: str = "helpdesk", **kwargs: float) -> BotLifecycle:
    backoff = Backoff(minimum=1.0, maximum=16.0, factor=2.0, rand=lambda: 0.5)  # no jitter
    settings = {"heartbeat_timeout": 30.0, "kill_grace": 5.0, "stable_after": 10.0, **kwargs}
    return BotLifecycle(name, clock=clock, backoff=backoff, **settings)


def started(clock: FakeClock, name: str = "helpdesk", **kwargs: float) -> BotLifecycle:
    lc = lifecycle(clock, name, **kwargs)
    assert lc.start() == [Spawn()]
    lc.spawned()
    return lc


def crash_and_respawn(lc: BotLifecycle, clock: FakeClock, code: int = 1, uptime: float = 0.5) -> float:
    """Let it run `uptime`, end with `code`; return the restart delay and spawn it again when due."""
    clock.advance(uptime)
    (action,) = lc.exited(code)
    assert isinstance(action, ScheduleSpawn) and lc.phase is Phase.BACKOFF
    assert lc.tick() == []  # not yet
    clock.advance(action.delay)
    assert lc.tick() == [Spawn()]
    lc.spawned()
    return action.delay


def test_a_bot_starts_connects_and_runs(clock: FakeClock) -> None:
    lc = started(clock)
    assert lc.phase is Phase.STARTING
    lc.connected()
    assert lc.phase is Phase.RUNNING
    lc.heartbeat(3)
    assert lc.in_flight == 3
    assert lc.tick() == []


def test_restart_delays_grow_while_it_keeps_failing_fast(clock: FakeClock) -> None:
    lc = started(clock)
    delays = [crash_and_respawn(lc, clock) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0]
    assert lc.failures == 6


def test_a_stable_run_resets_the_back_off(clock: FakeClock) -> None:
    lc = started(clock)
    assert [crash_and_respawn(lc, clock) for _ in range(3)] == [1.0, 2.0, 4.0]
    lc.connected()
    for _ in range(4):  # up and beating for longer than stable_after
        clock.advance(3.0)
        lc.heartbeat(0)
    assert crash_and_respawn(lc, clock, uptime=0.0) == 1.0
    assert lc.failures == 1


def test_a_run_shorter_than_stable_after_does_not_reset(clock: FakeClock) -> None:
    lc = started(clock)
    crash_and_respawn(lc, clock)
    assert crash_and_respawn(lc, clock, uptime=9.0) == 2.0


def test_exit_78_is_fatal_and_never_retried(clock: FakeClock) -> None:
    lc = started(clock)
    assert lc.exited(EX_CONFIG) == []
    assert lc.phase is Phase.FATAL
    clock.advance(3600.0)
    assert lc.tick() == []
    assert lc.next_deadline() is None
    assert lc.phase is Phase.FATAL


def test_exit_78_is_fatal_even_after_earlier_crashes(clock: FakeClock) -> None:
    lc = started(clock)
    crash_and_respawn(lc, clock)
    assert lc.exited(EX_CONFIG) == []
    assert lc.phase is Phase.FATAL


def test_all_fatal_is_visible_only_when_every_bot_failed(clock: FakeClock) -> None:
    a, b = started(clock, "a"), started(clock, "b")
    a.exited(EX_CONFIG)
    assert not all_fatal([a, b])
    b.connected()
    assert all_settled([a, b])  # connected or given up on: READY
    b.exited(EX_CONFIG)
    assert all_fatal([a, b])
    assert not all_fatal([])


def test_not_settled_while_one_is_starting_or_backing_off(clock: FakeClock) -> None:
    a, b = started(clock, "a"), started(clock, "b")
    a.connected()
    assert not all_settled([a, b])
    b.connected()
    assert all_settled([a, b])
    b.exited(1)
    assert not all_settled([a, b])


def test_a_silent_process_is_terminated_then_killed_then_restarted(clock: FakeClock) -> None:
    lc = started(clock, heartbeat_timeout=30.0, kill_grace=5.0)
    lc.connected()
    clock.advance(20.0)
    lc.heartbeat(1)
    clock.advance(29.0)
    assert lc.tick() == [] and healthy([lc], clock())
    clock.advance(1.0)
    assert lc.tick() == [Terminate(StopIntent.REPLACE)]
    assert lc.phase is Phase.STOPPING
    assert not healthy([lc], clock())
    clock.advance(4.9)
    assert lc.tick() == []
    clock.advance(0.1)
    assert lc.tick() == [Kill()]
    assert lc.tick() == []  # SIGKILL once
    (action,) = lc.exited(-signal.SIGKILL)
    assert isinstance(action, ScheduleSpawn)
    assert lc.phase is Phase.BACKOFF
    assert healthy([lc], clock())


def test_silence_before_connecting_counts_too(clock: FakeClock) -> None:
    lc = started(clock, heartbeat_timeout=10.0)
    clock.advance(10.0)
    assert lc.tick() == [Terminate(StopIntent.REPLACE)]


def test_next_deadline_follows_the_phase(clock: FakeClock) -> None:
    lc = started(clock, heartbeat_timeout=30.0)
    assert lc.next_deadline() == clock() + 30.0
    clock.advance(1.0)
    (action,) = lc.exited(1)
    assert isinstance(action, ScheduleSpawn)
    assert lc.next_deadline() == action.at
    lc.tick()


def test_stop_terminates_then_stays_stopped(clock: FakeClock) -> None:
    lc = started(clock)
    lc.connected()
    assert lc.stop(grace=31.0) == [Terminate(StopIntent.STOP)]
    clock.advance(31.0)
    assert lc.tick() == [Kill()]
    assert lc.exited(-signal.SIGKILL) == []
    assert lc.phase is Phase.STOPPED
    clock.advance(600.0)
    assert lc.tick() == []


def test_stop_while_backing_off_cancels_the_restart(clock: FakeClock) -> None:
    lc = started(clock)
    lc.exited(1)
    assert lc.stop(grace=5.0) == []
    assert lc.phase is Phase.STOPPED
    clock.advance(600.0)
    assert lc.tick() == []


def test_a_clean_exit_while_stopping_is_not_a_failure(clock: FakeClock) -> None:
    lc = started(clock)
    lc.stop(grace=5.0)
    assert lc.exited(0) == []
    assert lc.failures == 0


def test_restart_for_a_config_change_spawns_at_once_with_a_fresh_back_off(clock: FakeClock) -> None:
    lc = started(clock)
    crash_and_respawn(lc, clock)
    crash_and_respawn(lc, clock)
    lc.connected()
    assert lc.restart(grace=5.0) == [Terminate(StopIntent.RESTART)]
    assert lc.exited(0) == [Spawn()]
    lc.spawned()
    assert crash_and_respawn(lc, clock) == 1.0


def test_a_config_change_revives_a_fatal_bot(clock: FakeClock) -> None:
    lc = started(clock)
    lc.exited(EX_CONFIG)
    assert lc.restart(grace=5.0) == [Spawn()]
    lc.spawned()
    assert lc.phase is Phase.STARTING


def test_kill_now_during_a_stop(clock: FakeClock) -> None:
    lc = started(clock)
    lc.stop(grace=600.0)
    assert lc.kill_now() == [Kill()]
    assert lc.exited(-signal.SIGKILL) == []
    assert lc.phase is Phase.STOPPED


def test_disconnect_goes_back_to_starting(clock: FakeClock) -> None:
    lc = started(clock)
    lc.connected()
    lc.disconnected()
    assert lc.phase is Phase.STARTING
    lc.connected()
    assert lc.phase is Phase.RUNNING


def test_a_spawn_that_failed_backs_off(clock: FakeClock) -> None:
    lc = lifecycle(clock)
    assert lc.start() == [Spawn()]
    (action,) = lc.exited(None)
    assert isinstance(action, ScheduleSpawn) and action.delay == 1.0


def test_summary_and_status_line(clock: FakeClock) -> None:
    running = started(clock, "a")
    running.connected()
    running.heartbeat(3)
    busy = started(clock, "b")
    busy.connected()
    busy.heartbeat(1)
    backing_off = started(clock, "c")
    backing_off.exited(1)
    failed = started(clock, "d")
    failed.exited(EX_CONFIG)
    summary = summarize([running, busy, backing_off, failed], clock())
    assert summary == Summary(
        total=4, connected=2, starting=0, restarting=1, failed=1, stopping=0, not_responding=0, in_flight=4,
        not_connected=(("c", "restarting"), ("d", "failed")),
    )
    assert status_text(summary) == (
        "2/4 bots connected, 0 starting, 1 restarting, 1 failed; 4 conversations in flight; "
        "not connected: c (restarting), d (failed)"
    )


def test_status_says_why_a_bot_is_not_connected(clock: FakeClock) -> None:
    offline = started(clock, "offline", heartbeat_timeout=5.0)
    offline.report_problem("DingTalk Stream: gateway open failed (ClientConnectorError)")
    crashing = started(clock, "crashing")
    crashing.exited(1)
    crashing.problem = "exited with code 1"
    text = status_text(summarize([offline, crashing], clock()))
    assert text.endswith(
        "; not connected: offline (DingTalk Stream: gateway open failed (ClientConnectorError)), "
        "crashing (restarting; exited with code 1)"
    )
    offline.connected()
    assert "offline" not in status_text(summarize([offline, crashing], clock()))


def test_ready_is_due_when_every_bot_settled_or_the_start_window_is_over(clock: FakeClock) -> None:
    connected = started(clock, "a")
    connected.connected()
    offline = started(clock, "b")
    deadline = clock() + 30.0
    assert not ready_due([connected, offline], clock(), deadline)
    clock.advance(30.0)
    assert ready_due([connected, offline], clock(), deadline)  # one bot does not hold up the others
    offline.connected()
    assert ready_due([connected, offline], clock(), float("inf"))


def test_status_line_names_silent_and_stopping_bots(clock: FakeClock) -> None:
    silent = started(clock, "a", heartbeat_timeout=5.0)
    stopping = started(clock, "b")
    stopping.heartbeat(1)
    stopping.stop(grace=5.0)
    clock.advance(5.0)
    text = status_text(summarize([silent, stopping], clock()))
    assert text == (
        "0/2 bots connected, 1 starting, 0 restarting, 0 failed, 1 stopping, 1 not responding; 1 conversation in flight"
        "; not connected: a (not responding)"
    )
