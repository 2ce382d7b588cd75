"""A Debian container booting a real systemd (systemd-nspawn, own network), and ways into it from the host.

`nsenter` is the way in: without systemd as PID 1 on the host there is no machined, so `machinectl` and
`systemd-run -M` do not work. Commands run with a clean environment.
The simulators' control API is reached by a Python one-liner run in the container's network namespace only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTROL_URL = "http://127.0.0.1:18080/_sim"  # the simulator's port inside the container (its own loopback)

T = TypeVar("T")

# the container of the running system test (set by its fixture) and the first failed step: for the reports
diagnostics: dict[str, Any] = {"container": None, "failed_steps": {}}

_HTTP_CLIENT = r"""
import json, sys, urllib.error, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3]
request = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                                 headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        print(json.dumps({"status": response.status, "body": json.loads(response.read() or b"null")}))
except urllib.error.HTTPError as exc:
    print(json.dumps({"status": exc.code, "body": exc.read().decode(errors="replace")}))
except OSError as exc:
    print(json.dumps({"status": 0, "body": str(exc)}))
"""


class CommandFailed(AssertionError):
    pass


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def host_run(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A host command with Debian's tools first on PATH; raises CommandFailed with its output on failure."""
    full_env = {**os.environ, "PATH": SYSTEM_PATH, **(env or {})}
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    if result.returncode != 0:
        raise CommandFailed(_describe(argv, result))
    return result


def _describe(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> str:
    return (f"{' '.join(map(str, argv))}: exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}")


class Container:
    def __init__(self, root: Path, binds: dict[str, Path], log: Path, name: str = "ddsystest"):
        self.root = root
        self.binds = binds  # read-only: path inside -> host directory
        self.log = log
        self.name = name
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.baseline: set[str] = set()  # the paths in the container before the package came (tests set it)
        self._state = ""  # the last `systemctl is-system-running` answer, for the failure message

    # --- lifecycle ---------------------------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "PATH": SYSTEM_PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with self.log.open("wb") as log:
            # --register=no --keep-unit: no machined and no system bus on the host
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
                 "--private-network", "--console=read-only", "-M", self.name,
                 *(f"--bind-ro={host}:{inside}" for inside, host in self.binds.items())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        self.init_pid = wait_until(self._find_init, timeout, "the container's init process")
        try:
            wait_until(self._booted, timeout, "the container's systemd to finish booting", interval=0.2)
        except AssertionError as exc:
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False, timeout=10)
            raise AssertionError(
                f"{exc}; last state {self._state!r}, init pid {self.init_pid}\n--- jobs\n{jobs.stdout}{jobs.stderr}"
                f"\n--- systemd-nspawn output\n{self.boot_log()}"
            ) from None

    def _find_init(self) -> int:
        """The container's PID 1 as the host sees it: the child of systemd-nspawn that runs systemd. Early on
        nspawn has another, short-lived child (its setup process), which must not be taken for it."""
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited with {self.nspawn.returncode}:\n{self.boot_log()}")
        result = subprocess.run(["pgrep", "-P", str(self.nspawn.pid)], capture_output=True, text=True)
        for pid in result.stdout.split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                continue  # gone already
        return 0

    def _booted(self) -> bool:
        result = self.run("systemctl", "is-system-running", check=False, timeout=10)
        self._state = result.stdout.strip() or result.stderr.strip()
        if result.returncode != 0 and not result.stdout.strip():
            # nsenter itself failed: the pid is not (or no longer) the container's init; find it again
            self.init_pid = self._find_init() or self.init_pid
        return self._state in ("running", "degraded")

    def poweroff(self) -> None:
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None and self.init_pid:
            with contextlib.suppress(Exception):
                self.run("systemctl", "poweroff", check=False, timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nspawn.wait(20)
        if self.nspawn.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(10)
        self.nspawn = None

    def boot_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # --- commands ----------------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        command = ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--",
                   "env", "-i", f"PATH={SYSTEM_PATH}", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8",
                   *argv]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise CommandFailed(_describe(argv, result))
        return result

    def path(self, inside: str) -> Path:
        """The host path of a file in the container (its root is a plain directory)."""
        return self.root / inside.lstrip("/")

    def write(self, inside: str, text: str, *, mode: int = 0o644, owner: str = "root:root") -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch(mode=0o600)  # private until chown/chmod: it may hold a secret
        target.write_text(text, encoding="utf-8")
        # names resolve inside: the dingdifyd group exists only there
        self.run("chown", owner, inside)
        self.run("chmod", f"{mode:o}", inside)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        output = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def children(self, pid: int) -> list[int]:
        return [int(p) for p in self.run("pgrep", "-P", str(pid), check=False).stdout.split()]

    # --- the journal -------------------------------------------------------------------------------------

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args, check=False).stdout

    def journal_records(self, unit: str) -> list[dict[str, Any]]:
        records = []
        for line in self.journal("-u", unit, "-o", "json").splitlines():
            record = json.loads(line)
            message = record.get("MESSAGE")
            if isinstance(message, list):  # journald's form of a non-UTF-8 message
                record["MESSAGE"] = bytes(message).decode(errors="replace")
            records.append(record)
        return records

    # --- the simulators' control API ---------------------------------------------------------------------

    def sim(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """An HTTP call to the control API, from inside the container's network namespace."""
        payload = json.dumps(body) if body is not None else ""
        command = ["nsenter", "-t", str(self.init_pid), "-n", "--", sys.executable, "-I", "-c", _HTTP_CLIENT,
                   method, CONTROL_URL + path, payload]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
        if result.returncode != 0:
            raise CommandFailed(_describe(command[:6], result))
        answer = json.loads(result.stdout)
        return answer["status"], answer["body"]

    def sim_ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.sim(method, path, body)
        if status != 200:
            raise AssertionError(f"{method} {path}: {status} {answer}")
        return answer


def remove_tree(path: Path) -> None:
    """rm -rf, also of a container root whose files belong to users that exist only inside it."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
