"""System test of the container image: built with buildah from the Debian 13 .deb, inspected, and, where podman
can run containers on this machine, run against the simulators on the host's loopback.

The image comes from `packaging/build-image` (.ci/run makes it in the background, saved to
$DINGDIFYD_SYSTEM_IMAGE_TAR; otherwise the test builds it). The run uses podman with `--network host` (the
simulators listen on 127.0.0.1), the configuration mounted read-only, the secrets as podman secrets (in
/run/secrets, as compose puts them), the Dify URL from the environment (as etc/compose.yaml sets it), and a
named volume for the state: healthy, a message answered, logs on stdout, SIGTERM stops it with exit 0, and a new
container on the same volume continues the conversation.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.system import readme
from tests.system.container import SYSTEM_PATH, host_run, remove_tree, wait_until
from tests.system.test_system import DEBS, REPO, WORK, deb_name, ensure_debs

IMAGE_RELEASE = "trixie"
IMAGE_TAR = Path(os.environ.get("DINGDIFYD_SYSTEM_IMAGE_TAR", str(WORK / "image" / "dingdifyd-image.tar")))
NAME = f"dingdifyd-systest-{os.getpid()}"
CLIENT_ID = "dingcontainer"
CLIENT_SECRET = f"ct-client-secret-{secrets.token_hex(8)}"
DIFY_KEY = f"app-ct-{secrets.token_hex(8)}"
# This machine's podman: crun refuses the host's hybrid cgroup layout, and without CAP_SYS_RESOURCE podman's
# default rlimits cannot be set: runc, and limits below the host's.
PODMAN = ["podman", "--runtime", "runc"]
RUN_OPTIONS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=8192:8192"]

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]
step = pytest.mark.step


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    if check:
        return host_run([*PODMAN, *args], timeout=timeout)
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": SYSTEM_PATH})  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_tag() -> str:
    version = deb_name(IMAGE_RELEASE).split("_")[1]
    return f"dingdifyd:{version.replace('~', '-')}"


@pytest.fixture(scope="module")
def image() -> str:
    if os.geteuid() != 0 or not all(shutil.which(tool, path=SYSTEM_PATH) for tool in ("buildah", "podman")):
        pytest.skip("needs root, buildah and podman (apt-get install buildah podman runc)")
    tag = image_tag()
    if podman("image", "exists", tag, check=False).returncode != 0:
        ensure_debs(IMAGE_RELEASE)
        IMAGE_TAR.parent.mkdir(parents=True, exist_ok=True)
        host_run([str(REPO / "packaging/build-image"), "--save", str(IMAGE_TAR), str(DEBS / deb_name(IMAGE_RELEASE))],
                 timeout=900)  # fmt: skip
    return tag


@step
def test_image_is_what_the_readme_says(image: str) -> None:
    [line] = [line for line in readme.block("container") if line.startswith("packaging/build-image")]
    assert f"tag {image}" in line, line
    assert IMAGE_TAR.exists(), "the image was not saved for `docker load`"
    listing = host_run(["tar", "-tf", str(IMAGE_TAR)], timeout=120).stdout
    assert "manifest.json" in listing.split(), "not a docker-archive"
    [info] = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "dingdifyd"
    assert config["Entrypoint"] == ["/usr/lib/dingdifyd/dingdifyd-init"]
    assert "/var/lib/dingdifyd" in config["Volumes"]
    assert config.get("StopSignal") == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["DINGDIFYD_CONFIG"] == "/etc/dingdifyd/dingdifyd.yaml"
    assert env["CREDENTIALS_DIRECTORY"] == "/run/secrets"
    assert info["Healthcheck"]["Test"] == ["CMD", "/usr/lib/dingdifyd/dingdifyd-init", "--health"]
    print(f"\nimage {image}: {info['Size'] / 1e6:.0f} MB")


@pytest.fixture(scope="module")
def can_run(image: str) -> None:
    """Whether podman can run a container on this machine at all; if not, the rest is skipped, saying why."""
    probe = podman("run", "--rm", *RUN_OPTIONS, "--network", "host", "--entrypoint", "/usr/bin/dingdifyd", image,
                   "--version", check=False, timeout=120)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-500:]}")
    assert probe.stdout.strip().startswith("dingdifyd ")


class Setup:
    """The simulators on the host's loopback, the configuration, the secrets and the volume of the run."""

    def __init__(self, root: Path):
        self.root = root
        self.dingtalk_port = free_port()
        self.dify_port = free_port()
        self.volume = f"{NAME}-state"
        self.config = root / "dingdifyd.yaml"
        self.simulator: subprocess.Popen[bytes] | None = None
        self.containers: list[str] = []

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.dingtalk_port}/_sim"

    def sim(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.control + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    def run_container(self, name: str, image: str) -> None:
        self.containers.append(name)
        podman("run", "--detach", "--name", name, *RUN_OPTIONS, "--network", "host",
               "--volume", f"{self.volume}:/var/lib/dingdifyd",
               "--volume", f"{self.config}:/etc/dingdifyd/dingdifyd.yaml:ro",
               "--secret", f"{NAME}-client-secret,target=helpdesk.dingtalk_app_client_secret",
               "--secret", f"{NAME}-dify-key,target=helpdesk.dify_app_api_key",
               "--env", f"DIFY_OPEN_API_URL=http://127.0.0.1:{self.dify_port}/v1",
               image)  # fmt: skip

    def healthy(self, name: str) -> bool:
        return podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0

    def answer(self, text: str) -> dict[str, Any]:
        status, pushed = self.sim("POST", "/messages", {"text": text, "staff_id": "carol"})
        assert status == 200, pushed

        def finished() -> dict[str, Any] | None:
            status, card = self.sim("GET", f"/cards/{pushed['out_track_id']}")
            return card if status == 200 and card["done"] else None

        return wait_until(finished, 60, f"the card of {text!r}")


@pytest.fixture(scope="module")
def setup(image: str, can_run: None) -> Iterator[Setup]:
    root = WORK / f"container-{os.getpid()}"
    remove_tree(root)
    root.mkdir(parents=True)
    made = Setup(root)
    # the configuration holds no secret and no Dify URL: they come as secrets and from the environment
    made.config.write_text(f"""\
dingtalk_api_base: http://127.0.0.1:{made.dingtalk_port}
dingtalk_oapi_base: http://127.0.0.1:{made.dingtalk_port}
card_update_interval: 0.05
stop_timeout: 5
bots:
  - name: helpdesk
    dingtalk_app_client_id: {CLIENT_ID}
    dify_app_type: chatbot
""", encoding="utf-8")
    made.config.chmod(0o644)
    for secret, value in (("client-secret", CLIENT_SECRET), ("dify-key", DIFY_KEY)):
        file = root / secret
        file.write_text(value, encoding="utf-8")
        podman("secret", "rm", f"{NAME}-{secret}", check=False)
        podman("secret", "create", f"{NAME}-{secret}", str(file))
    log = (root / "simulator.log").open("wb")
    made.simulator = subprocess.Popen(
        [sys.executable, "-m", "dingdifyd.simulator", "--dingtalk-port", str(made.dingtalk_port),
         "--dify-port", str(made.dify_port), "--app", f"{CLIENT_ID}:{CLIENT_SECRET}", "--no-default-dify-apps",
         "--dify-app", f"{DIFY_KEY}:chatbot", "--mention-turn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
    )  # fmt: skip
    try:
        wait_until(lambda: made.sim("GET", "/status")[0] == 200, 30, "the simulators")
        yield made
    finally:
        for name in made.containers:
            podman("rm", "--force", "--time", "5", name, check=False)
        podman("volume", "rm", "--force", made.volume, check=False)
        for secret in ("client-secret", "dify-key"):
            podman("secret", "rm", f"{NAME}-{secret}", check=False)
        made.simulator.terminate()
        made.simulator.wait(20)
        log.close()
        remove_tree(root)


@step
def test_container_runs_answers_and_logs_to_stdout(setup: Setup, image: str) -> None:
    name = f"{NAME}-1"
    setup.run_container(name, image)
    wait_until(lambda: setup.healthy(name), 60, "the container to become healthy")
    card = setup.answer("hello from a container")
    assert card["text"].startswith("Echo: hello from a container | Turn 1 of this conversation."), card
    processes = podman("exec", name, "sh", "-c", "id -un; cat /proc/1/cmdline | tr '\\0' ' '").stdout.splitlines()
    assert processes[0] == "dingdifyd", processes
    assert processes[1].strip() == "/usr/bin/python3 /usr/lib/dingdifyd/dingdifyd-init", processes
    logs = podman("logs", name)
    assert logs.stderr.strip() == "" or "healthcheck" in logs.stderr, logs.stderr  # podman's own notes only
    lines = logs.stdout.splitlines()
    assert any(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO \[supervisor\] .*: ready: 1/1 bots connected", line)
               for line in lines), logs.stdout  # fmt: skip
    assert not [line for line in lines if line.startswith("<")], "journal priority prefixes in the logs"
    assert CLIENT_SECRET not in logs.stdout and DIFY_KEY not in logs.stdout


@step
def test_sigterm_stops_the_container_gracefully(setup: Setup) -> None:
    name = f"{NAME}-1"
    started = time.monotonic()
    podman("stop", "--time", "45", name, timeout=90)
    stopped_after = time.monotonic() - started
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, state  # SIGKILL after the 45 s would be 137
    assert "all bot processes stopped" in podman("logs", name).stdout
    print(f"\npodman stop took {stopped_after:.1f} s")


@step
def test_a_new_container_on_the_same_volume_continues_the_conversation(setup: Setup, image: str) -> None:
    name = f"{NAME}-2"
    podman("rm", f"{NAME}-1")
    setup.run_container(name, image)
    wait_until(lambda: setup.healthy(name), 60, "the new container to become healthy")
    card = setup.answer("and again")
    assert card["text"].startswith("Echo: and again | Turn 2 of this conversation."), card
