"""System test: the .deb on a real systemd.

Builds the package (and, in the background, a newer build of it for the upgrade step), lints it, checks the
units' exposure, boots Debian 12 with systemd as PID 1 in a systemd-nspawn container with its own network,
installs the package there with apt and drives `dingdifyd@ci` against the simulators
(`python -m dingdifyd.simulator`, run inside the container from the package's own venv, as a transient unit)
through their HTTP control API.

Run it as root with `pytest -m system -v` (.ci/run does). The steps share one container and run in order;
once a step fails the later ones are skipped, and the failed step's report carries the container's journal.
The container is powered off (killed if need be) and removed whatever happens.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.system.container import SYSTEM_PATH, Container, diagnostics, host_run, remove_tree, wait_until

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("DINGDIFYD_SYSTEM_WORK", "/var/tmp/dingdifyd-system"))
ROOTFS_TAR = Path(os.environ.get("DINGDIFYD_ROOTFS_TAR", str(WORK / "rootfs.tar")))
UPGRADE_SUFFIX = "+ci1"

UNIT = "dingdifyd@ci"
SIMULATOR_UNIT = "dingdifyd-sim"
VENV_PYTHON = "/usr/lib/dingdifyd/venv/bin/python3"
CONFIG = "/etc/dingdifyd/ci.yaml"
CREDENTIAL = "/etc/dingdifyd/credentials/helpdesk.dify_app_api_key"
DROP_IN_DIR = f"/etc/systemd/system/{UNIT}.service.d"
CLIENT_ID = "dingci"
# random per run, so that finding one in the journal can only mean it leaked there
CLIENT_SECRET = f"ci-client-secret-{secrets.token_hex(8)}"
DIFY_KEY = f"app-ci-{secrets.token_hex(8)}"
STAFF_ID = "alice"

TOOLS = {
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "lintian": "lintian",
    "nsenter": "util-linux",
    "systemd-analyze": "systemd",
    "pgrep": "procps",
}

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]
step = pytest.mark.step


def _version() -> str:
    text = (REPO / "dingdifyd" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "no __version__ in dingdifyd/__init__.py"
    return match.group(1)


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it builds a rootfs and boots it with systemd-nspawn"
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool, path=SYSTEM_PATH) is None})
    if missing:
        return f"needs apt-get install {' '.join(missing)}"
    return None


# --- fixtures ----------------------------------------------------------------------------------------------


@dataclass
class Debs:
    dir: Path
    version: str
    upgrade_build: subprocess.Popen[bytes]
    upgrade_log: Path

    @property
    def first(self) -> str:
        return f"dingdifyd_{self.version}_amd64.deb"

    @property
    def upgrade_version(self) -> str:
        return self.version + UPGRADE_SUFFIX

    def upgrade(self, timeout: float = 600) -> str:
        """The newer build's file name, once its background build is done."""
        code = self.upgrade_build.wait(timeout)
        assert code == 0, f"the upgrade build failed:\n{self.upgrade_log.read_text(errors='replace')[-4000:]}"
        return f"dingdifyd_{self.upgrade_version}_amd64.deb"


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    path = WORK / f"run-{os.getpid()}"
    remove_tree(path)
    path.mkdir(parents=True)
    yield path
    remove_tree(path)


@pytest.fixture(scope="module")
def rootfs_build(work: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    """The container image, made in the background unless .ci/run (or an earlier run) made it already."""
    if ROOTFS_TAR.exists():
        yield None
        return
    log = (work / "make-rootfs.log").open("wb")
    process = subprocess.Popen([str(REPO / "tests/system/make-rootfs"), str(ROOTFS_TAR)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def debs(work: Path) -> Iterator[Debs]:
    out = work / "debs"
    out.mkdir()
    host_run([str(REPO / "packaging/build-deb"), str(out)], timeout=900)
    # the newer build for the upgrade step: made meanwhile, the container steps hardly use the CPU
    upgrade_log = work / "build-upgrade.log"
    with upgrade_log.open("wb") as log:
        upgrade = subprocess.Popen(
            [str(REPO / "packaging/build-deb"), str(out)], stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, env={**os.environ, "DINGDIFYD_DEB_VERSION_SUFFIX": UPGRADE_SUFFIX},
        )  # fmt: skip
    built = Debs(out, _version(), upgrade, upgrade_log)
    yield built
    if upgrade.poll() is None:
        upgrade.kill()
        upgrade.wait()


@pytest.fixture(scope="module")
def container(work: Path, rootfs_build: subprocess.Popen[bytes] | None, debs: Debs) -> Iterator[Container]:
    if rootfs_build is not None:
        assert rootfs_build.wait(900) == 0, f"make-rootfs failed, see {work / 'make-rootfs.log'}"
    root = work / "root"
    root.mkdir()
    host_run(["tar", "-C", str(root), "-xf", str(ROOTFS_TAR)], timeout=300)
    box = Container(root, debs.dir, work / "nspawn.log")
    diagnostics["container"] = box
    try:
        box.boot()
        yield box
    finally:
        box.poweroff()
        diagnostics["container"] = None
        remove_tree(root)


@dataclass
class Chat:
    """alice's 1:1 chat with the bot, and the Dify conversation it should keep across everything."""

    box: Container
    turns: int = 0
    conversation_id: str | None = None
    cards: list[dict[str, Any]] = field(default_factory=list)

    def say(self, text: str) -> dict[str, Any]:
        """Push a message; return its card once done, checking it answered and continued the conversation."""
        pushed = self.box.sim_ok("POST", "/messages", {"text": text, "staff_id": STAFF_ID})
        track = pushed["out_track_id"]

        def finished() -> dict[str, Any] | None:
            status, card = self.box.sim("GET", f"/cards/{track}")
            return card if status == 200 and card["done"] else None

        card = wait_until(finished, 30, f"the card of {text!r} to finish")
        card["frame"] = pushed["message_id"]
        self.turns += 1
        assert not card["failed"], card
        assert card["text"].startswith(f"Echo: {text} | Turn {self.turns} of this conversation."), card["text"]
        conversations = [c for c in self.box.sim_ok("GET", "/dify/conversations") if c["user"].endswith(STAFF_ID)]
        assert len(conversations) == 1, f"the chat should have one Dify conversation: {conversations}"
        if self.conversation_id is None:
            self.conversation_id = conversations[0]["id"]
        else:
            requests = self.box.sim_ok("GET", "/dify/requests?path=/chat-messages")
            assert requests[-1]["conversation_id"] == self.conversation_id, requests[-1]
        assert conversations[0]["id"] == self.conversation_id
        assert conversations[0]["turns"] == self.turns
        self.cards.append(card)
        return card


@pytest.fixture(scope="module")
def chat(container: Container) -> Chat:
    return Chat(container)


# --- helpers -----------------------------------------------------------------------------------------------


def ci_config(**changes: Any) -> str:
    """/etc/dingdifyd/ci.yaml: the simulators inside the container; the Dify key comes as a credential."""
    values = {"card_update_interval": 0.05, "dify_app_type": "chatbot", **changes}
    return f"""\
dify_open_api_url: http://127.0.0.1:18081/v1
dingtalk_api_base: http://127.0.0.1:18080
dingtalk_oapi_base: http://127.0.0.1:18080
card_update_interval: {values['card_update_interval']}
stop_timeout: 5
restart_delay_min: 0.2
ci_unknown_key: this line makes a warning
bots:
  - name: helpdesk
    dingtalk_app_client_id: {CLIENT_ID}
    dingtalk_app_client_secret: {CLIENT_SECRET}
    dify_app_type: {values['dify_app_type']}
"""


def write_config(box: Container, **changes: Any) -> None:
    box.write(CONFIG, ci_config(**changes), mode=0o640, owner="root:dingdifyd")


def connected(box: Container) -> bool:
    status = box.show(UNIT, "ActiveState", "StatusText")
    return status["ActiveState"] == "active" and status["StatusText"].startswith("1/1 bots connected")


def bot_pid(box: Container) -> int:
    """The one bot process under the supervisor (0 while there is none)."""
    children = box.children(box.main_pid(UNIT))
    assert len(children) <= 1, f"one bot, several processes: {children}"
    return children[0] if children else 0


def record(box: Container, needle: str, after: float = 0.0) -> dict[str, Any] | None:
    """The last journal record of the unit whose message contains `needle` (logged after `after`, in s)."""
    found = None
    for entry in box.journal_records(UNIT):
        if needle in entry["MESSAGE"] and int(entry["__REALTIME_TIMESTAMP"]) / 1e6 >= after:
            found = entry
    return found


# --- the package, statically ---------------------------------------------------------------------------------


def test_package_is_lintian_clean(debs: Debs) -> None:
    deb = debs.dir / debs.first
    assert host_run(["dpkg-deb", "--field", str(deb), "Version"], timeout=30).stdout.strip() == debs.version
    host_run(["lintian", "--fail-on", "error,warning", str(deb)], timeout=300)
    contents = host_run(["dpkg-deb", "--contents", str(deb)], timeout=30).stdout
    for path in ("./usr/bin/dingdifyd", "./lib/systemd/system/dingdifyd@.service",
                 "./lib/systemd/system/dingdifyd.service", "./usr/lib/sysusers.d/dingdifyd.conf",
                 "./usr/share/man/man8/dingdifyd.8.gz", "./usr/share/man/man5/dingdifyd.yaml.5.gz"):
        assert f" {path}" in contents, f"{path} is not in the package"


@pytest.mark.parametrize("unit", ["dingdifyd@.service", "dingdifyd.service"])
def test_unit_exposure_is_at_most_2(work: Path, unit: str) -> None:
    path = REPO / "packaging" / "systemd" / unit
    result = host_run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(path)], timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 2.0


# --- the package on a real systemd ----------------------------------------------------------------------------


@step
def test_install(container: Container, debs: Debs) -> None:
    box = container
    box.run("apt-get", "install", "-y", "--no-install-recommends", f"/srv/debs/{debs.first}", timeout=180)
    assert box.run("dingdifyd", "--version").stdout.strip() == f"dingdifyd {debs.version}"
    assert "dingdifyd" in box.run("getent", "passwd", "dingdifyd").stdout
    assert box.run("test", "-f", "/etc/dingdifyd/example.yaml", check=False).returncode == 0
    # any output is a problem: verify prints parse errors but still exits 0
    verify = box.run("systemd-analyze", "verify", "--man=no", f"{UNIT}.service", "dingdifyd.service", check=False)
    assert (verify.stdout + verify.stderr).strip() == ""
    live = box.run("systemd-analyze", "security", f"{UNIT}.service", check=False).stdout
    assert re.search(r"Overall exposure level for \S+: [01]\.\d", live), live


@step
def test_start_is_active_only_after_ready(container: Container) -> None:
    box = container
    write_config(box)
    box.write(CREDENTIAL, DIFY_KEY, mode=0o600)
    box.write(f"{DROP_IN_DIR}/credentials.conf",
              f"[Service]\nLoadCredential=helpdesk.dify_app_api_key:{CREDENTIAL}\n")  # fmt: skip
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "--no-block", f"{UNIT}.service")
    # No simulated DingTalk yet: the bot cannot connect, so no READY=1 within start_timeout (30 s), so systemd
    # must keep it "activating" meanwhile.
    wait_until(lambda: record(box, "[helpdesk]"), 30, "the bot process to start")
    states = []
    for _ in range(10):
        states.append(box.show(UNIT, "ActiveState")["ActiveState"])
        time.sleep(0.2)
    assert set(states) == {"activating"}, states

    box.run("systemd-run", f"--unit={SIMULATOR_UNIT}", "--property=Type=exec", VENV_PYTHON, "-I",
            "-m", "dingdifyd.simulator", "--dingtalk-port", "18080", "--dify-port", "18081",
            "--app", f"{CLIENT_ID}:{CLIENT_SECRET}", "--no-default-dify-apps", "--dify-app", f"{DIFY_KEY}:chatbot",
            "--mention-turn")  # fmt: skip
    wait_until(lambda: box.sim("GET", "/status")[0] == 200, 30, "the simulators")
    wait_until(lambda: box.show(UNIT, "ActiveState")["ActiveState"] == "active", 60, f"{UNIT} to become active")
    assert connected(box), box.show(UNIT, "StatusText")
    assert box.sim_ok("GET", "/connections")["by_app"][CLIENT_ID] == 1


@step
def test_message_is_answered_in_a_streamed_card(container: Container, chat: Chat) -> None:
    card = chat.say("ping-1")
    assert card["stream_updates"] >= 2, f"the answer did not stream: {card}"
    assert card["delivered"]


@step
def test_redelivered_frame_makes_no_second_card(container: Container, chat: Chat) -> None:
    box = container
    frame = chat.cards[-1]["frame"]
    cards_before = len(box.sim_ok("GET", "/cards"))
    box.sim_ok("POST", f"/frames/{frame}/redeliver")
    wait_until(lambda: len(box.sim_ok("GET", f"/frames/{frame}")["acks"]) >= 2, 30, "the redelivery's ACK")
    assert len(box.sim_ok("GET", "/cards")) == cards_before
    [conversation] = box.sim_ok("GET", "/dify/conversations")
    assert conversation["turns"] == chat.turns, "the redelivered message went to Dify again"


@step
def test_journal_has_priorities_and_no_secrets(container: Container) -> None:
    box = container
    raw = box.journal("-u", UNIT, "-o", "json")
    assert CLIENT_SECRET not in raw
    assert DIFY_KEY not in raw
    assert "ping-1" not in raw, "message text in the journal at INFO level"
    main_pid = str(box.main_pid(UNIT))

    ready = record(box, "[supervisor] dingdifyd.supervisor.arbiter: ready:")
    assert ready is not None and ready["PRIORITY"] == "6" and ready["_PID"] == main_pid
    assert ready["SYSLOG_IDENTIFIER"] == UNIT
    answered = record(box, "answered in")
    assert answered is not None and answered["PRIORITY"] == "6"
    assert answered["MESSAGE"].startswith("[helpdesk] ") and answered["_PID"] != main_pid
    warning = record(box, "ci_unknown_key: unknown key, ignored")
    assert warning is not None and warning["PRIORITY"] == "4", warning

    warnings_only = box.journal("-u", UNIT, "-p", "warning", "-o", "cat")
    assert "ci_unknown_key" in warnings_only
    assert "answered in" not in warnings_only


@step
def test_killed_bot_process_is_replaced_and_conversation_kept(container: Container, chat: Chat) -> None:
    box = container
    main_pid, victim = box.main_pid(UNIT), bot_pid(box)
    assert victim
    box.run("kill", "-9", str(victim))
    wait_until(lambda: bot_pid(box) not in (0, victim), 30, "a new bot process")
    wait_until(lambda: connected(box), 30, "the new bot process to connect")
    assert box.main_pid(UNIT) == main_pid
    assert box.show(UNIT, "NRestarts")["NRestarts"] == "0"
    killed = record(box, f"pid {victim} killed by SIGKILL")
    assert killed is not None and killed["PRIORITY"] == "4", killed
    chat.say("ping-2")


@step
def test_killed_supervisor_is_restarted_by_systemd(container: Container, chat: Chat) -> None:
    box = container
    old = box.main_pid(UNIT)
    box.run("kill", "-9", str(old))

    def restarted() -> bool:
        status = box.show(UNIT, "NRestarts", "MainPID")
        return status["NRestarts"] == "1" and status["MainPID"] not in ("0", str(old)) and connected(box)

    wait_until(restarted, 60, "systemd to restart the daemon")
    # the old supervisor's bot process went with it (KillMode=mixed): one supervisor, one bot
    processes = box.run("pgrep", "-f", "dingdifyd run -c", check=False).stdout.split()
    assert len(processes) == 2, processes
    chat.say("ping-3")


@step
def test_reload_applies_a_valid_config(container: Container, chat: Chat) -> None:
    box = container
    main_pid, old_bot = box.main_pid(UNIT), bot_pid(box)
    since = time.time()
    write_config(box, card_update_interval=0.08)
    box.run("systemctl", "reload", UNIT)
    wait_until(lambda: record(box, "reloaded: 0 added, 0 removed, 1 restarted", since), 30, "the reload")
    wait_until(lambda: bot_pid(box) not in (0, old_bot) and connected(box), 30, "the changed bot to restart")
    assert box.main_pid(UNIT) == main_pid
    chat.say("ping-4")


@step
def test_reload_refuses_a_broken_config(container: Container, chat: Chat) -> None:
    box = container
    main_pid, bot = box.main_pid(UNIT), bot_pid(box)
    write_config(box, card_update_interval=0.08, dify_app_type="nonsense")
    refused = box.run("systemctl", "reload", UNIT, check=False)
    assert refused.returncode != 0, "systemctl reload accepted a broken config"
    assert record(box, "bots[0].dify_app_type: 'nonsense' is not one of") is not None
    assert connected(box)
    assert (box.main_pid(UNIT), bot_pid(box)) == (main_pid, bot)
    # a SIGHUP that bypasses the check: the daemon refuses the file itself, at error priority, and runs on
    since = time.time()
    box.run("systemctl", "kill", "--kill-who=main", "--signal=SIGHUP", UNIT)
    rejected = wait_until(lambda: record(box, "reload rejected, keeping the running configuration", since),
                          30, "the daemon to reject the file")  # fmt: skip
    assert rejected["PRIORITY"] == "3", rejected
    assert (box.main_pid(UNIT), bot_pid(box)) == (main_pid, bot)
    chat.say("ping-5")
    write_config(box, card_update_interval=0.08)
    box.run("systemctl", "reload", UNIT)


@step
def test_watchdog_restarts_a_hung_daemon(container: Container, chat: Chat) -> None:
    box = container
    box.write(f"{DROP_IN_DIR}/watchdog.conf", "[Service]\nWatchdogSec=2s\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", UNIT)
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    first = box.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    wait_until(lambda: box.show(UNIT, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != first,
               30, "a WATCHDOG=1 ping")  # fmt: skip
    hung = box.main_pid(UNIT)
    box.run("kill", "-STOP", str(hung))

    def replaced() -> bool:
        status = box.show(UNIT, "NRestarts", "MainPID")
        return int(status["NRestarts"]) > restarts and status["MainPID"] not in ("0", str(hung)) and connected(box)

    wait_until(replaced, 60, "the watchdog to restart the hung daemon")
    assert record(box, "Watchdog timeout") is not None
    box.run("rm", f"{DROP_IN_DIR}/watchdog.conf")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", UNIT)
    chat.say("ping-6")


@step
def test_upgrade_restarts_the_running_instance(container: Container, debs: Debs, chat: Chat) -> None:
    box = container
    deb = debs.upgrade()
    old = box.main_pid(UNIT)
    box.run("apt-get", "install", "-y", "--no-install-recommends", f"/srv/debs/{deb}", timeout=180)
    assert box.run("dpkg-query", "-W", "-f", "${Version}", "dingdifyd").stdout == debs.upgrade_version
    wait_until(lambda: box.main_pid(UNIT) not in (0, old) and connected(box), 60, "the restarted daemon")
    assert box.show(UNIT, "NeedDaemonReload")["NeedDaemonReload"] == "no"
    chat.say("ping-7")


@step
def test_stop_is_clean(container: Container) -> None:
    box = container
    since = time.time()
    box.run("systemctl", "stop", UNIT, timeout=90)
    status = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert status == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, status
    assert record(box, "all bot processes stopped", since) is not None
    assert box.run("pgrep", "-f", "dingdifyd run -c", check=False).stdout.strip() == ""


@step
def test_purge_stops_instances_and_removes_state(container: Container) -> None:
    box = container
    box.run("systemctl", "start", UNIT)
    assert box.path("/var/lib/dingdifyd/ci/helpdesk").is_dir()
    box.run("apt-get", "purge", "-y", "dingdifyd", timeout=180)
    assert box.show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert box.run("pgrep", "-f", "dingdifyd run -c", check=False).stdout.strip() == ""
    assert not box.path("/var/lib/dingdifyd").exists()
    assert not box.path("/usr/bin/dingdifyd").exists()
    assert not box.path("/etc/dingdifyd/example.yaml").exists()
    assert box.path(CONFIG).exists(), "purge removed the admin's own config"
    box.run("systemctl", "stop", SIMULATOR_UNIT, check=False)
