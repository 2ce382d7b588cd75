"""The supervisor as a real process, forking real children, talking to a real NOTIFY_SOCKET.

The supervisor runs `tests/integration/run_supervisor.py` (the real Arbiter with the targets of
`child_targets.py`, chosen by bot name). A datagram socket bound in a temporary directory stands in for systemd:
every assertion is on what it received, on the pid files the children write, or on the supervisor's exit code.
Every wait is bounded; nothing asserts how long something took.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from dingdifyd.errors import EX_CONFIG, EX_USAGE
from dingdifyd.supervisor.arbiter import Arbiter
from tests.integration.child_targets import OFFLINE_PROBLEM, dispatch

ROOT = Path(__file__).resolve().parents[2]
WAIT = 15.0  # upper bound of any single wait; a passing run needs a small fraction of it

Datagram = list[str]  # the KEY=value fields of one sd_notify message


class NotifySocket:
    """systemd's side of sd_notify: collects every datagram the supervisor sends."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[Datagram] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.messages.append(data.decode().split("\n"))
        return True

    def wait_for(self, field: str | Callable[[Datagram], bool], after: int = 0, what: str = "") -> int:
        """Index of the first datagram at or after `after` that has `field` (or satisfies it)."""
        match = field if callable(field) else (lambda message: field in message)
        deadline = time.monotonic() + WAIT
        checked = after
        while True:
            for index in range(checked, len(self.messages)):
                if match(self.messages[index]):
                    return index
            checked = max(checked, len(self.messages))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no datagram {what or field!r} after #{after}; got {self.messages}")
            self.receive(min(remaining, 0.5))

    def drain(self) -> None:
        while self.receive(0.05):
            pass

    def fields(self, prefix: str, start: int = 0, stop: int | None = None) -> list[tuple[int, str]]:
        """(index, field) for every field starting with `prefix` in datagrams [start, stop)."""
        stop = len(self.messages) if stop is None else stop
        return [(i, f) for i in range(start, stop) for f in self.messages[i] if f.startswith(prefix)]


def status(text: str) -> Callable[[Datagram], bool]:
    return lambda message: any(f.startswith("STATUS=") and text in f for f in message)


def status_without(text: str) -> Callable[[Datagram], bool]:
    return lambda message: any(f.startswith("STATUS=") and text not in f for f in message)


class Supervisor:
    def __init__(self, workdir: Path, notify: NotifySocket):
        self.workdir = workdir
        self.notify = notify
        self.config = workdir / "dingdifyd.yaml"
        self.stderr_path = workdir / "supervisor.log"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self, bots: list[str], client_ids: dict[str, str] | None = None, **daemon: object) -> None:
        client_ids = client_ids or {}
        doc: dict[str, object] = {
            "state_dir": str(self.workdir),
            "heartbeat_timeout": 1,
            "stop_timeout": 1,
            "restart_delay_min": 0.05,
            "restart_delay_max": 0.5,
            **daemon,
            "bots": [
                {
                    "name": name,
                    "dingtalk_app_client_id": client_ids.get(name, f"ding-{name}"),
                    "dingtalk_app_client_secret": f"client-secret-of-{name}",
                    "dify_app_type": "chatbot",
                    "dify_app_api_key": f"app-key-of-{name}",
                }
                for name in bots
            ],
        }
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.config.chmod(0o600)

    def start(self, *bot_names: str, watchdog_usec: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = self.notify.path
        env["PYTHONPATH"] = str(ROOT)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.run_supervisor", str(self.config), *bot_names],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own process group: the teardown can reach orphans too
            )

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self) -> int:
        assert self.process is not None
        try:
            return self.process.wait(WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running; its log:\n{self.log()}") from None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def pids(self, bot: str, what: str = "pids") -> list[int]:
        path = self.workdir / f"{bot}.{what}"
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    def kill_all(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(WAIT)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    short = tempfile.mkdtemp(prefix="dd-notify-")
    notify = NotifySocket(os.path.join(short, "notify"))
    sup = Supervisor(tmp_path, notify)
    try:
        yield sup
    finally:
        sup.kill_all()
        notify.close()
        shutil.rmtree(short, ignore_errors=True)


# --- start, status, graceful stop ---------------------------------------------------------------------


def test_ready_once_every_bot_connected_status_and_graceful_stop(supervisor: Supervisor) -> None:
    supervisor.write_config(["steady-a", "steady-b"])
    supervisor.start()
    notify = supervisor.notify

    ready = notify.wait_for("READY=1")
    statuses = notify.fields("STATUS=", 0, ready)
    assert statuses, "a STATUS line precedes READY=1"
    assert "2/2 bots connected" in statuses[-1][1], statuses
    notify.wait_for(status("2 conversations in flight"))  # each child reports one in its heartbeats

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.log()
    notify.drain()
    assert notify.fields("STOPPING=1", ready), notify.messages
    assert len(notify.fields("READY=1")) == 1
    for bot in ("steady-a", "steady-b"):
        (pid,) = supervisor.pids(bot)
        assert supervisor.pids(bot, "term") == [pid], f"{bot} got SIGTERM"
        assert not alive(pid)
    log = supervisor.log()
    assert "steady-a: started (pid" in log and "steady-b: started (pid" in log


def test_a_bot_that_cannot_connect_does_not_hold_up_ready_and_status_says_why(supervisor: Supervisor) -> None:
    supervisor.write_config(["steady-a", "offline-b"], start_timeout=1)
    supervisor.start()
    notify = supervisor.notify
    ready = notify.wait_for("READY=1")  # the start window is used up: ready, with the healthy bot serving
    statuses = [field for _, field in notify.fields("STATUS=", 0, ready + 1)]
    assert "1/2 bots connected" in statuses[-1], statuses
    assert f"not connected: offline-b ({OFFLINE_PROBLEM})" in statuses[-1], statuses
    (healthy,) = supervisor.pids("steady-a")
    (offline,) = supervisor.pids("offline-b")
    assert alive(healthy) and alive(offline)  # nobody was restarted for it
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.log()


def test_a_bot_process_holds_its_own_secrets_and_no_other_bots(supervisor: Supervisor) -> None:
    supervisor.write_config(["secrets-a", "secrets-b"])
    supervisor.start()
    supervisor.notify.wait_for("READY=1")  # each has written what it holds by the time it connects
    for bot, other in (("secrets-a", "secrets-b"), ("secrets-b", "secrets-a")):
        held = set(json.loads((supervisor.workdir / f"{bot}.secrets").read_text()))
        assert {f"client-secret-of-{bot}", f"app-key-of-{bot}"} <= held  # its own, usable
        assert not {f"client-secret-of-{other}", f"app-key-of-{other}"} & held, held  # nothing of the other's
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.log()


def test_killed_child_is_replaced_and_reconnects(supervisor: Supervisor) -> None:
    supervisor.write_config(["steady-a"])
    supervisor.start()
    notify = supervisor.notify
    ready = notify.wait_for("READY=1")
    (first,) = supervisor.pids("steady-a")

    os.kill(first, signal.SIGKILL)
    down = notify.wait_for(status("0/1 bots connected"), ready)
    notify.wait_for(status("1/1 bots connected"), down)

    pids = supervisor.pids("steady-a")
    assert len(pids) == 2 and pids[0] == first and pids[1] != first
    assert alive(pids[1])
    assert supervisor.running
    assert f"steady-a: pid {first} killed by SIGKILL" in supervisor.log()


# --- exit 78 ------------------------------------------------------------------------------------------


def test_exit_78_stays_down_while_the_other_bot_runs(supervisor: Supervisor) -> None:
    supervisor.write_config(["fatal-x", "steady-a"])
    supervisor.start(watchdog_usec=400_000)  # a ping every 0.2 s: a clock the test can count on
    notify = supervisor.notify

    ready = notify.wait_for("READY=1")  # FATAL counts as settled
    assert "1 failed" in notify.fields("STATUS=", 0, ready)[-1][1]
    # several watchdog periods, each far longer than restart_delay_min, with no restart of fatal-x
    index = ready
    for _ in range(5):
        index = notify.wait_for("WATCHDOG=1", index + 1)
    assert supervisor.pids("fatal-x") and len(supervisor.pids("fatal-x")) == 1
    assert supervisor.running
    assert "fatal-x: configuration or credentials refused (exit 78)" in supervisor.log()

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait() == 0


def test_every_bot_exiting_78_makes_the_supervisor_exit_78(supervisor: Supervisor) -> None:
    supervisor.write_config(["fatal-x", "fatal-y"])
    supervisor.start()
    assert supervisor.wait() == EX_CONFIG, supervisor.log()
    supervisor.notify.drain()
    assert not supervisor.notify.fields("READY=1"), supervisor.notify.messages
    assert len(supervisor.pids("fatal-x")) == 1 and len(supervisor.pids("fatal-y")) == 1


# --- liveness and the watchdog ------------------------------------------------------------------------


def test_hung_child_is_replaced_and_watchdog_withheld_meanwhile(supervisor: Supervisor) -> None:
    supervisor.write_config(["steady-a", "hang-b"])
    supervisor.start(watchdog_usec=400_000)
    notify = supervisor.notify

    unhealthy = notify.wait_for(status("not responding"))
    recovered = notify.wait_for(status_without("not responding"), unhealthy + 1)
    resumed = notify.wait_for("WATCHDOG=1", recovered)

    assert notify.fields("WATCHDOG=1", 0, unhealthy), "pings while every child was healthy"
    assert not notify.fields("WATCHDOG=1", unhealthy, recovered), notify.messages[unhealthy:recovered]
    assert resumed > recovered
    wait_until(lambda: len(supervisor.pids("hang-b")) >= 2, "a replacement for hang-b")
    first = supervisor.pids("hang-b")[0]
    assert not alive(first)
    assert supervisor.pids("steady-a") and len(supervisor.pids("steady-a")) == 1, "the other bot kept running"
    log = supervisor.log()
    assert "hang-b: no heartbeat for 1 s; terminating it" in log
    assert "hang-b: still running; sending SIGKILL" in log


# --- reload -------------------------------------------------------------------------------------------


def test_sighup_adds_removes_restarts_and_rejects_a_broken_config(supervisor: Supervisor) -> None:
    supervisor.write_config(["steady-a", "steady-b", "steady-c"])
    supervisor.start()
    notify = supervisor.notify
    notify.wait_for("READY=1")
    (a1,), (b1,), (c1,) = (supervisor.pids(bot) for bot in ("steady-a", "steady-b", "steady-c"))

    # a removed, b unchanged, c changed, d added
    supervisor.write_config(["steady-b", "steady-c", "steady-d"], client_ids={"steady-c": "ding-c-new"})
    supervisor.send(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1")
    monotonic = [f for f in notify.messages[reloading] if f.startswith("MONOTONIC_USEC=")]
    assert monotonic and int(monotonic[0].split("=", 1)[1]) > 0, notify.messages[reloading]
    ready = notify.wait_for("READY=1", reloading)
    assert "3/3 bots connected" in notify.fields("STATUS=", reloading, ready)[-1][1]

    wait_until(lambda: not alive(a1), "steady-a to stop")
    assert supervisor.pids("steady-a") == [a1] and supervisor.pids("steady-a", "term") == [a1]
    assert supervisor.pids("steady-b") == [b1] and alive(b1)
    c_pids = supervisor.pids("steady-c")
    assert len(c_pids) == 2 and c_pids[0] == c1 and alive(c_pids[1])
    assert supervisor.pids("steady-c", "term") == [c1]
    (d1,) = supervisor.pids("steady-d")

    supervisor.config.write_text("bots:\n  - name: steady-b\n")  # no client id, secret, app type, key
    supervisor.send(signal.SIGHUP)
    rejected_reload = notify.wait_for("RELOADING=1", ready + 1)
    notify.wait_for("READY=1", rejected_reload)
    notify.wait_for(status("last reload rejected"), rejected_reload)
    assert supervisor.pids("steady-b") == [b1] and alive(b1)
    assert supervisor.pids("steady-c") == c_pids and alive(c_pids[1])
    assert supervisor.pids("steady-d") == [d1] and alive(d1)
    assert "reload rejected, keeping the running configuration: bots[0].dify_app_type: missing" in supervisor.log()

    supervisor.send(signal.SIGTERM)
    assert supervisor.wait() == 0


# --- stop escalation ----------------------------------------------------------------------------------


def test_child_ignoring_sigterm_is_killed_after_stop_timeout(supervisor: Supervisor) -> None:
    supervisor.write_config(["stubborn-a", "steady-b"])
    supervisor.start()
    notify = supervisor.notify
    notify.wait_for("READY=1")
    (stubborn,) = supervisor.pids("stubborn-a")

    supervisor.send(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    assert supervisor.wait() == 0, supervisor.log()
    assert supervisor.pids("stubborn-a", "term") == [stubborn], "it was asked first"
    assert not alive(stubborn)
    assert "stubborn-a: still running; sending SIGKILL" in supervisor.log()
    assert supervisor.pids("steady-b", "term") == supervisor.pids("steady-b")


def test_second_sigterm_kills_at_once(supervisor: Supervisor) -> None:
    # stop_timeout far beyond WAIT: only the second signal can end this stop within the test's bound
    supervisor.write_config(["stubborn-a"], stop_timeout=600)
    supervisor.start()
    notify = supervisor.notify
    notify.wait_for("READY=1")
    (stubborn,) = supervisor.pids("stubborn-a")

    supervisor.send(signal.SIGTERM)
    notify.wait_for("STOPPING=1")
    wait_until(lambda: supervisor.pids("stubborn-a", "term") == [stubborn], "the first SIGTERM to arrive")
    supervisor.send(signal.SIGTERM)
    assert supervisor.wait() == 0, supervisor.log()
    assert not alive(stubborn)
    assert "second SIGTERM: killing 1 bot processes now" in supervisor.log()


# --- refusing to start --------------------------------------------------------------------------------


def test_invalid_config_at_start_returns_78(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("bots:\n  - name: helpdesk\n")
    arbiter = Arbiter(str(config), target=dispatch, log_setup=None)
    assert arbiter.run() == EX_CONFIG
    assert "config: bots[0].dingtalk_app_client_id: missing" in caplog.text


def test_unknown_bot_name_returns_64(supervisor: Supervisor, caplog: pytest.LogCaptureFixture) -> None:
    supervisor.write_config(["steady-a"])
    arbiter = Arbiter(str(supervisor.config), bot_names=["nope"], target=dispatch, log_setup=None)
    assert arbiter.run() == EX_USAGE
    assert "--bot nope: no such bot" in caplog.text
