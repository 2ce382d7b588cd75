"""System test: the .deb of each Debian release, from a signed apt repository, on a real systemd.

For Debian 12 (bookworm) and Debian 13 (trixie), each in turn: takes the release's two builds (the version and
a newer `+ci1` one; .ci/run makes them in the background with `packaging/build-deb --release R`, or the test
does), publishes the first in a signed repository (`packaging/build-repo`, a throwaway key), boots the release
with systemd as PID 1 in a systemd-nspawn container with its own network, runs the README's repository lines
there (the repository served on the container's loopback), and drives `dingdifyd@ci` against the simulators
(`python -m dingdifyd.simulator`, run inside the container from the package's own venv, as a transient unit)
through their HTTP control API. Then it publishes the newer build and checks that `apt-get upgrade` restarts the
running instance and keeps its configuration, state and conversation, and that purging removes what the package
made and nothing else.

Run it as root with `pytest -m system -v` (.ci/run does). The steps of a release share one container and run
in order; once a step fails the later ones of that release are skipped, and the failed step's report carries
the container's journal. The container is powered off (killed if need be) and removed whatever happens.
"""

from __future__ import annotations

import hashlib
import json
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

from dingdifyd.logs.fields import EVENTS
from tests.system import readme
from tests.system.container import SYSTEM_PATH, Container, diagnostics, host_run, remove_tree, wait_until

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("DINGDIFYD_SYSTEM_WORK", "/var/tmp/dingdifyd-system"))
DEBS = Path(os.environ.get("DINGDIFYD_SYSTEM_DEBS", str(WORK / "debs")))
# Debian releases: codename -> (version number, Python minor version)
SUPPORTED = {"bookworm": ("12", "3.11"), "trixie": ("13", "3.13")}
RELEASES = os.environ.get("DINGDIFYD_SYSTEM_RELEASES", "bookworm trixie").split()
UPGRADE_SUFFIX = "+ci1"
REPO_PORT = 8079  # the repository's web server, on the container's own loopback

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
    "dpkg-deb": "dpkg",
    "apt-ftparchive": "apt-utils",
    "gpg": "gpg",
    "nsenter": "util-linux",
    "systemd-analyze": "systemd",
    "pgrep": "procps",
}

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]
step = pytest.mark.step


def _version() -> str:
    text = (REPO / "dingdifyd" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "no __version__ in dingdifyd/__init__.py"
    return match.group(1)


def _arch() -> str:
    return host_run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()


def deb_version(release: str, suffix: str = "") -> str:
    return f"{_version()}{suffix}~deb{SUPPORTED[release][0]}u1"


def deb_name(release: str, suffix: str = "") -> str:
    return f"dingdifyd_{deb_version(release, suffix)}_{_arch()}.deb"


def rootfs_tar(release: str) -> Path:
    return WORK / f"rootfs-{release}.tar"


def missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it builds root file systems and boots them with systemd-nspawn"
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool, path=SYSTEM_PATH) is None})
    if missing:
        return f"needs apt-get install {' '.join(missing)}"
    return None


def ensure_rootfs(release: str) -> Path:
    """The release's container image (made by .ci/run in the background, or now)."""
    tar = rootfs_tar(release)
    if not tar.exists():
        host_run([str(REPO / "tests/system/make-rootfs"), release, str(tar)], timeout=900)
    return tar


def ensure_debs(release: str) -> Path:
    """The release's two builds, linted (made by .ci/run in the background, or now); returns the build log."""
    log = DEBS / f"build-{release}.log"
    if not ((DEBS / deb_name(release)).exists() and (DEBS / deb_name(release, UPGRADE_SUFFIX)).exists()):
        DEBS.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as output:
            code = subprocess.run(
                [str(REPO / "packaging/build-deb"), "--release", release, "--lintian", "--version-suffix", "",
                 "--version-suffix", UPGRADE_SUFFIX, str(DEBS)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, timeout=1800,
            ).returncode  # fmt: skip
        assert code == 0, f"packaging/build-deb --release {release} failed:\n{log.read_text(errors='replace')[-4000:]}"
    return log


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    path = WORK / f"run-{os.getpid()}"
    remove_tree(path)
    path.mkdir(parents=True)
    yield path
    remove_tree(path)


@dataclass
class AptRepository:
    """The signed repository on the host (bound into each container at /srv/repo), one key for the whole run."""

    root: Path
    gnupghome: Path

    def publish(self, *debs: Path) -> str:
        return host_run([str(REPO / "packaging/build-repo"), "--gnupghome", str(self.gnupghome), "--throwaway-key",
                         str(self.root), *map(str, debs)], timeout=300).stdout  # fmt: skip


@pytest.fixture(scope="module")
def apt_repository(work: Path) -> AptRepository:
    (work / "repo").mkdir()
    return AptRepository(work / "repo", work / "gnupg")


@pytest.fixture(scope="module", params=RELEASES)
def release(request: pytest.FixtureRequest) -> str:
    assert request.param in SUPPORTED, f"DINGDIFYD_SYSTEM_RELEASES: {request.param} is not one of {list(SUPPORTED)}"
    return request.param


@dataclass
class Debs:
    dir: Path
    release: str
    build_log: Path

    @property
    def version(self) -> str:
        return deb_version(self.release)

    @property
    def upgrade_version(self) -> str:
        return deb_version(self.release, UPGRADE_SUFFIX)

    @property
    def first(self) -> Path:
        return self.dir / deb_name(self.release)

    @property
    def upgrade(self) -> Path:
        return self.dir / deb_name(self.release, UPGRADE_SUFFIX)


@pytest.fixture(scope="module")
def debs(work: Path, release: str) -> Debs:
    return Debs(DEBS, release, ensure_debs(release))


@pytest.fixture(scope="module")
def container(work: Path, release: str, debs: Debs, apt_repository: AptRepository) -> Iterator[Container]:
    tar = ensure_rootfs(release)
    root = work / f"root-{release}"
    root.mkdir()
    host_run(["tar", "-C", str(root), "-xf", str(tar)], timeout=300)
    box = Container(root, {"/srv/debs": debs.dir, "/srv/repo": apt_repository.root}, work / f"nspawn-{release}.log")
    diagnostics["container"] = box
    try:
        box.boot()
        # no network: Debian's own sources cannot be reached (the rootfs has every dependency of the package)
        box.run("sh", "-c", "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*")
        box.baseline = snapshot(box)
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


def file_digests(box: Container, *paths: str) -> dict[str, str]:
    return {path: hashlib.sha256(box.path(path).read_bytes()).hexdigest() for path in paths}


# Files of the container that are the admin's or the system's, not the package's: what a purge must leave alone.
SNAPSHOT_EXCLUDE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache", "/var/lib/apt",
                    "/var/lib/dpkg", "/var/lib/systemd", "/srv", "/etc/ld.so.cache")


def snapshot(box: Container) -> set[str]:
    """Every path in the container outside SNAPSHOT_EXCLUDE (piuparts' way to see what a package leaves)."""
    prune = " -o ".join(f"-path {path}" for path in SNAPSHOT_EXCLUDE)
    listing = box.run("sh", "-c", f"find / -xdev \\( {prune} \\) -prune -o -print", timeout=120).stdout
    return set(listing.splitlines())


# --- the packages, statically ---------------------------------------------------------------------------------


def test_package_is_lintian_clean_and_fits_its_release(debs: Debs) -> None:
    log = debs.build_log.read_text(errors="replace")
    for version in (debs.version, debs.upgrade_version):
        assert re.search(rf"lintian Lintian v\S+ has nothing to say about dingdifyd {re.escape(version)}$", log,
                         re.MULTILINE), f"no clean lintian run of {version} in {debs.build_log}"  # fmt: skip
    deb = str(debs.first)
    fields = host_run(["dpkg-deb", "--show", "--showformat", "${Version}\n${Architecture}\n${Depends}", deb],
                      timeout=30).stdout.split("\n")  # fmt: skip
    assert fields[0] == debs.version
    assert fields[1] == _arch()
    python = SUPPORTED[debs.release][1]
    major, minor = python.split(".")
    assert f"python3 (>= {python})" in fields[2] and f"python3 (<< {major}.{int(minor) + 1})" in fields[2], fields[2]
    contents = host_run(["dpkg-deb", "--contents", deb], timeout=30).stdout
    unit_dir = "./lib/systemd/system" if debs.release == "bookworm" else "./usr/lib/systemd/system"
    for path in ("./usr/bin/dingdifyd", f"{unit_dir}/dingdifyd@.service", f"{unit_dir}/dingdifyd.service",
                 "./usr/lib/sysusers.d/dingdifyd.conf", "./usr/share/man/man8/dingdifyd.8.gz",
                 "./usr/share/man/man5/dingdifyd.yaml.5.gz", "./usr/lib/dingdifyd/try-restart-checked",
                 f"./usr/lib/dingdifyd/venv/lib/python{python}/site-packages/dingdifyd/__init__.py"):
        assert f" {path}" in contents, f"{path} is not in the package"


@pytest.mark.parametrize("unit", ["dingdifyd@.service", "dingdifyd.service"])
def test_unit_exposure_is_at_most_2(unit: str) -> None:
    if os.geteuid() != 0 or shutil.which("systemd-analyze", path=SYSTEM_PATH) is None:
        pytest.skip("needs root and systemd-analyze")
    path = REPO / "packaging" / "systemd" / unit
    result = host_run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(path)], timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 2.0


# --- the package on a real systemd ----------------------------------------------------------------------------


@step
def test_another_releases_package_is_refused(container: Container, release: str) -> None:
    """Bad input: the package of another release (its venv is for another Python) is refused by apt, with the
    reason, before anything is installed: the README's .deb line, with that file."""
    box = container
    other = next((r for r in SUPPORTED if r != release and (DEBS / deb_name(r)).exists()), None)
    if other is None:
        pytest.skip("the other release's package is not built yet (.ci/run builds both first)")
    [line] = [line for line in readme.block("install-deb") if line.startswith("apt-get install")]
    command = re.sub(r"\./dingdifyd_\S+\.deb", f"./{deb_name(other)}", line)
    refused = box.run("sh", "-c", f"cd /srv/debs && {command}", check=False, timeout=120)
    assert refused.returncode != 0, refused.stdout
    output = refused.stdout + refused.stderr
    # e.g. "dingdifyd : Depends: python3 (< 3.12) but 3.13.5-1 is to be installed"
    assert re.search(r"dingdifyd : Depends: python3 \([<>=]+ 3\.\d+\) but \S+ is to be installed", output), output
    assert box.run("dpkg-query", "-W", "dingdifyd", check=False).returncode != 0, "it was installed anyway"


@step
def test_install_from_the_repository(container: Container, debs: Debs, apt_repository: AptRepository,
                                     release: str) -> None:  # fmt: skip
    box = container
    published = apt_repository.publish(debs.first)
    assert f"dists/{release}" in published
    # one repository for every release tested so far, each its own suite
    suites = {path.name for path in (apt_repository.root / "dists").iterdir()}
    assert release in suites and suites <= set(SUPPORTED), suites
    assert all((apt_repository.root / "dists" / suite / "InRelease").exists() for suite in suites)
    box.run("systemd-run", "--unit=apt-repository", "--property=Type=exec", "python3", "-m", "http.server",
            "--bind", "127.0.0.1", "--directory", "/srv/repo", str(REPO_PORT))  # fmt: skip
    wait_until(lambda: box.run("curl", "-fsS", "-o", "/dev/null", f"http://127.0.0.1:{REPO_PORT}/", check=False)
               .returncode == 0, 30, "the repository's web server")  # fmt: skip
    # the README's lines, verbatim but for the repository's address
    lines = readme.block("install-repository")
    assert lines[0].startswith("repo="), lines[0]
    script = "\n".join(["set -e", f"repo=http://127.0.0.1:{REPO_PORT}", *lines[1:]])
    box.run("sh", "-c", script, timeout=300)
    sources = box.path("/etc/apt/sources.list.d/dingdifyd.sources").read_text()
    assert f"Suites: {release}\n" in sources and "Signed-By: /etc/apt/keyrings/" in sources, sources
    policy = box.run("apt-cache", "policy", "dingdifyd").stdout
    assert f"http://127.0.0.1:{REPO_PORT} {release}/main" in policy, policy

    assert box.run("dpkg-query", "-W", "-f", "${Version}", "dingdifyd").stdout == debs.version
    assert box.run("dingdifyd", "--version").stdout.strip() == f"dingdifyd {_version()}"
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
def test_journal_fields_can_be_queried(container: Container) -> None:
    """The native entries' fields, through a real journald: the queries the README shows."""
    box = container
    entries = [json.loads(line) for line in
               box.journal("-u", UNIT, "DINGDIFYD_BOT=helpdesk", "DINGDIFYD_EVENT=answered", "-o", "json").splitlines()]
    assert entries, "no entry with DINGDIFYD_BOT=helpdesk DINGDIFYD_EVENT=answered"
    entry = entries[-1]
    assert entry["MESSAGE_ID"] == EVENTS["answered"] and entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == UNIT and "answered in" in entry["MESSAGE"]
    assert entry["DINGDIFYD_MSG_ID"] and re.fullmatch(r"[0-9a-f]{12}", entry["DINGDIFYD_CONVERSATION"])
    # every line about that message, whatever logged it
    about = box.journal("-u", UNIT, f"DINGDIFYD_MSG_ID={entry['DINGDIFYD_MSG_ID']}", "-o", "cat")
    assert f"message {entry['DINGDIFYD_MSG_ID']} from " in about and "answered in" in about
    assert box.journal("DINGDIFYD_EVENT=failed", "--since", "today", "-o", "cat").strip() == ""
    started = box.journal("-u", UNIT, "DINGDIFYD_EVENT=started", "-o", "json").splitlines()
    assert started and json.loads(started[-1])["DINGDIFYD_BOT"] == "helpdesk"


@step
def test_status_asks_the_running_instance(container: Container) -> None:
    box = container
    result = box.run("dingdifyd", "status", "-c", CONFIG)
    assert f"{UNIT}: running since" in result.stdout and "  helpdesk: connected since" in result.stdout, result.stdout
    assert CLIENT_SECRET not in result.stdout and DIFY_KEY not in result.stdout
    document = json.loads(box.run("dingdifyd", "status", "--json").stdout)
    [instance] = [i for i in document["instances"] if i["name"] == "ci"]
    [bot] = instance["status"]["bots"]
    assert bot["state"] == "running" and bot["answered_today"] >= 1, bot
    mode = box.run("stat", "-c", "%a %G", "/run/dingdifyd/ci/status.sock").stdout.split()
    assert mode == ["660", "dingdifyd"], mode
    # a member of the group dingdifyd may ask; anybody else may not (exit 4)
    # a system account: an ordinary one would also get subordinate ids (/etc/subuid), which the purge step
    # would then find left behind
    box.run("useradd", "--system", "--no-create-home", "--groups", "dingdifyd", "ops")
    try:
        member = box.run("runuser", "-u", "ops", "--", "dingdifyd", "status", "-c", CONFIG, check=False)
    finally:
        box.run("userdel", "ops")
    assert member.returncode == 0, member.stdout + member.stderr
    stranger = box.run("runuser", "-u", "nobody", "--", "dingdifyd", "status", "-c", CONFIG, check=False)
    assert stranger.returncode == 4 and "permission denied" in stranger.stdout, stranger.stdout + stranger.stderr


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


def state_files(box: Container) -> set[str]:
    """The instance's state: its files, but for SQLite's write-ahead log and shared memory, which exist only
    while a database is open (the Dify slot table's, between two answers, may well be closed)."""
    found = box.run("find", "/var/lib/dingdifyd/ci").stdout.split()
    return {path for path in found if not path.endswith(("-wal", "-shm", "-journal"))}


@step
def test_apt_upgrade_from_the_repository_restarts_and_keeps_everything(
    container: Container, debs: Debs, apt_repository: AptRepository, chat: Chat
) -> None:
    box = container
    published = apt_repository.publish(debs.upgrade)
    assert debs.upgrade.name in published or "dists/" in published
    kept = (CONFIG, CREDENTIAL, f"{DROP_IN_DIR}/credentials.conf", "/etc/dingdifyd/example.yaml")
    before = file_digests(box, *kept)
    state_before = state_files(box)
    old = box.main_pid(UNIT)
    # the earlier steps' restarts must not count against systemd's start limit (5 starts in 10 s)
    box.run("systemctl", "reset-failed", UNIT)
    box.run("sh", "-c", readme.block("upgrade")[0], timeout=300)
    assert box.run("dpkg-query", "-W", "-f", "${Version}", "dingdifyd").stdout == debs.upgrade_version
    wait_until(lambda: box.main_pid(UNIT) not in (0, old) and connected(box), 60, "the restarted daemon")
    assert box.show(UNIT, "NeedDaemonReload")["NeedDaemonReload"] == "no"
    assert file_digests(box, *kept) == before, "the upgrade changed a configuration file"
    assert state_before <= state_files(box), "state was lost"
    chat.say("ping-7")  # the same Dify conversation, turn 7


@step
def test_upgrade_keeps_an_instance_whose_config_the_new_version_refuses(container: Container, chat: Chat) -> None:
    """Bad input: the file was edited into something the (new) version refuses, and not reloaded. An upgrade
    (here: the package reinstalled, which runs the same maintainer scripts) leaves that instance running, and
    both apt's output and the unit's journal say why."""
    box = container
    old = box.main_pid(UNIT)
    since = time.time()
    write_config(box, card_update_interval=0.08, dify_app_type="nonsense")
    upgraded = box.run("apt-get", "install", "--reinstall", "-y", "dingdifyd", timeout=300)
    output = upgraded.stdout + upgraded.stderr
    assert f"{UNIT}.service: not restarted with the new version of dingdifyd, which refuses {CONFIG}" in output, output
    assert "bots[0].dify_app_type: 'nonsense' is not one of" in output
    assert box.main_pid(UNIT) == old and connected(box)
    why = record(box, "not restarted with the new version of dingdifyd", since)
    assert why is not None and why["PRIORITY"] == "3", why
    assert "bots[0].dify_app_type" in why["MESSAGE"]
    chat.say("ping-8")
    write_config(box, card_update_interval=0.08)
    box.run("systemctl", "restart", UNIT)
    wait_until(lambda: connected(box), 60, "the restarted daemon")


@step
def test_stop_is_clean(container: Container) -> None:
    box = container
    since = time.time()
    box.run("systemctl", "stop", UNIT, timeout=90)
    status = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert status == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, status
    assert record(box, "all bot processes stopped", since) is not None
    assert box.run("pgrep", "-f", "dingdifyd run -c", check=False).stdout.strip() == ""
    stopped = box.run("dingdifyd", "status", "-c", CONFIG, check=False)
    assert stopped.returncode == 3 and stopped.stdout.startswith(f"{UNIT}: stopped"), stopped.stdout


@step
def test_purge_removes_what_the_package_made_and_nothing_else(container: Container) -> None:
    box = container
    box.run("systemctl", "start", UNIT)
    assert box.path("/var/lib/dingdifyd/ci/helpdesk").is_dir()
    box.run("systemctl", "stop", SIMULATOR_UNIT, "apt-repository", check=False)
    box.run("apt-get", "purge", "-y", "dingdifyd", timeout=180)
    assert box.show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed")
    assert box.run("pgrep", "-f", "dingdifyd run -c", check=False).stdout.strip() == ""
    assert not box.path("/var/lib/dingdifyd").exists()
    assert not box.path("/usr/bin/dingdifyd").exists()
    assert not box.path("/etc/dingdifyd/example.yaml").exists()
    assert box.path(CONFIG).exists(), "purge removed the admin's own config"
    after = snapshot(box)
    assert box.baseline - after == set(), "purge removed files that were there before the package"
    # what is left is the admin's: the instance's config, credential and drop-in, the repository's key and source
    admin = {"/etc/dingdifyd", CONFIG, str(Path(CREDENTIAL).parent), CREDENTIAL, DROP_IN_DIR,
             f"{DROP_IN_DIR}/credentials.conf", "/etc/apt/keyrings/dingdifyd.asc",
             "/etc/apt/sources.list.d/dingdifyd.sources"}  # fmt: skip
    # the account stays, as Debian leaves system accounts (its files elsewhere may still be its)
    accounts = {f"/etc/{name}-" for name in ("passwd", "group", "shadow", "gshadow")}
    left = after - box.baseline - admin - accounts
    assert left == set(), f"left behind by the package: {sorted(left)}"


@step
def test_install_from_a_deb_file(container: Container, debs: Debs) -> None:
    """The README's other way in: the .deb file itself (its dependencies are in the container already)."""
    box = container
    [line] = [line for line in readme.block("install-deb") if line.startswith("apt-get install")]
    command = re.sub(r"\./dingdifyd_\S+\.deb", f"./{debs.upgrade.name}", line)
    box.run("sh", "-c", f"cd /srv/debs && {command}", timeout=180)
    assert box.run("dpkg-query", "-W", "-f", "${Version}", "dingdifyd").stdout == debs.upgrade_version
    assert box.run("dingdifyd", "check-config", "-q", "-c", "/etc/dingdifyd/example.yaml").returncode == 0
