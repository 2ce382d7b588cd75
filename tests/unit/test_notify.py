"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from dingdifyd.supervisor.notify import Notifier, watchdog_interval


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    directory = tempfile.mkdtemp(prefix="dd-notify-")  # AF_UNIX paths must stay short
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_each_message_is_one_datagram(systemd: socket.socket) -> None:
    notifier = Notifier()
    notifier.ready()
    notifier.status("2/3 bots connected\nsecond line")
    notifier.watchdog()
    notifier.stopping(extend_timeout=2.5)
    assert received(systemd) == ["READY=1"]
    assert received(systemd) == ["STATUS=2/3 bots connected second line"]
    assert received(systemd) == ["WATCHDOG=1"]
    assert received(systemd) == ["STOPPING=1", "EXTEND_TIMEOUT_USEC=2500000"]


def test_reloading_carries_the_monotonic_clock_in_the_same_datagram(systemd: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = received(systemd)
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dingdifyd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().ready()
        assert sock.recv(100) == b"READY=1"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.ready()
    notifier.reloading()
    notifier.stopping()


def test_a_vanished_socket_is_not_an_error(systemd: socket.socket) -> None:
    path = os.environ["NOTIFY_SOCKET"]
    os.unlink(path)
    notifier = Notifier()
    # neither raises nor leaks a socket (filterwarnings=error would catch that), and says it was not sent
    assert notifier.send("WATCHDOG=1") is False
    notifier.watchdog()
    # systemd back (a new socket at the same path): the same notifier reaches it, nothing stale was kept
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(path)
        again.settimeout(5.0)
        assert notifier.send("WATCHDOG=1") is True
        assert again.recv(100) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_and_only_for_our_pid(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, pid=4242) == expected
