"""The child's side of the supervisor protocol, and the supervisor's signal queue, over real pipes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from dingdifyd.supervisor import signals
from dingdifyd.worker.heartbeat import ParentChannel, heartbeat_interval, heartbeat_loop

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def pipe() -> Iterator[tuple[Connection, Connection]]:
    reader, writer = FORK.Pipe(duplex=False)
    yield reader, writer
    reader.close()
    writer.close()


def test_messages_arrive_as_small_tuples(pipe: tuple[Connection, Connection]) -> None:
    reader, writer = pipe
    channel = ParentChannel(writer)
    channel.connected()
    channel.heartbeat(3)
    channel.disconnected()
    assert [reader.recv() for _ in range(3)] == [("connected",), ("heartbeat", 3), ("disconnected",)]


def test_a_gone_parent_never_raises(pipe: tuple[Connection, Connection]) -> None:
    reader, writer = pipe
    channel = ParentChannel(writer)
    reader.close()
    channel.heartbeat(1)
    channel.connected()
    assert not channel.parent_alive
    channel.close()
    channel.disconnected()


def test_a_parent_that_stops_reading_costs_heartbeats_not_a_blocked_loop(pipe: tuple[Connection, Connection]) -> None:
    reader, writer = pipe
    channel = ParentChannel(writer)
    for _ in range(20_000):  # far more than a pipe buffer holds
        channel.heartbeat(0)
    assert channel.parent_alive
    assert reader.recv() == ("heartbeat", 0)


async def receive(reader: Connection, count: int) -> list[object]:
    messages = []
    while len(messages) < count:
        if reader.poll():
            messages.append(reader.recv())
        else:
            await asyncio.sleep(0.005)  # let the heartbeat coroutine run
    return messages


async def test_heartbeat_loop_beats_with_in_flight_and_ends_when_the_parent_is_gone(
    pipe: tuple[Connection, Connection],
) -> None:
    reader, writer = pipe
    channel = ParentChannel(writer)
    counts = iter(range(100))
    beats = asyncio.create_task(heartbeat_loop(channel, 0.01, lambda: next(counts)))
    first, second = await asyncio.wait_for(receive(reader, 2), 5.0)
    assert (first, second) == (("heartbeat", 0), ("heartbeat", 1))
    reader.close()
    await asyncio.wait_for(beats, 5.0)
    assert not channel.parent_alive


async def test_something_worth_reporting_is_reported_before_the_next_beat(
    pipe: tuple[Connection, Connection],
) -> None:
    """An answer that ended shows in `dingdifyd status` at once, not a beat (up to 2 s) later."""
    reader, writer = pipe
    channel = ParentChannel(writer)
    soon = asyncio.Event()
    answered = iter(range(100))
    beats = asyncio.create_task(heartbeat_loop(channel, 3600.0, lambda: 0, lambda: {"n": next(answered)}, soon))
    try:
        (first,) = await asyncio.wait_for(receive(reader, 1), 5.0)
        soon.set()  # without it, the next beat would come in an hour
        (second,) = await asyncio.wait_for(receive(reader, 1), 5.0)
        assert (first, second) == (("heartbeat", 0, {"n": 0}), ("heartbeat", 0, {"n": 1}))
    finally:
        beats.cancel()


def test_heartbeat_interval_leaves_room_for_missed_beats() -> None:
    assert heartbeat_interval(30.0) == 2.0
    assert heartbeat_interval(1.0) == 0.25


def test_signal_queue_records_and_wakes() -> None:
    queue = signals.SignalQueue([signal.SIGUSR1, signal.SIGUSR2])
    queue.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        readable, _, _ = select.select([queue.fileno()], [], [], 5.0)
        assert readable == [queue.fileno()]
        assert queue.drain() == [signal.SIGUSR2, signal.SIGUSR1]
        assert queue.drain() == []
        readable, _, _ = select.select([queue.fileno()], [], [], 0)
        assert readable == []
    finally:
        queue.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def report_signal_state(conn: Connection) -> None:
    signals.reset_in_child()  # what the supervisor's fork entry does first in every child
    conn.send(
        (
            signal.set_wakeup_fd(-1),
            signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL,
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        )
    )


def test_a_forked_child_sheds_the_supervisor_signal_handling(pipe: tuple[Connection, Connection]) -> None:
    reader, writer = pipe
    queue = signals.SignalQueue([signal.SIGUSR1])
    queue.install()
    try:
        child = FORK.Process(target=report_signal_state, args=(writer,))
        child.start()
        child.join(10.0)
        assert child.exitcode == 0
        assert reader.poll(5.0)
        wakeup_fd, usr1_default, term_default, int_default = reader.recv()
        assert wakeup_fd == -1  # reset_in_child had already taken the supervisor's wakeup fd away
        assert usr1_default and term_default and int_default
        assert queue.drain() == []
    finally:
        queue.uninstall()


def test_a_large_report_into_a_nearly_full_pipe_is_skipped_whole_never_torn():
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    channel = ParentChannel(writer)
    try:
        for _ in range(10_000):  # small heartbeats until the pipe is full (the last ones are dropped)
            channel.heartbeat(1)
        received = [reader.recv() for _ in range(300)]  # a page or two free again: less than the big one needs
        big = {"metrics": {"c": [["dingdifyd_answers", [["outcome", f"{i:0>60}"]], i] for i in range(400)]}}
        channel.heartbeat(2, big)  # larger than PIPE_BUF: it would not fit whole
        while reader.poll(0):
            received.append(reader.recv())  # every message intact: a torn one would fail to unpickle
        assert received and all(message == ("heartbeat", 1) for message in received)
        channel.heartbeat(2, big)  # room again: it goes through whole
        assert reader.recv() == ("heartbeat", 2, big)
        assert channel.parent_alive
    finally:
        reader.close()
        writer.close()
