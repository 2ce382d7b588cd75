"""The README's quick start on a fresh machine of each Debian release: its first command, verbatim, in a clean
root of the release (the system test's image, not booted, with the network), once as root where sudo is not
installed, and once as a user who may sudo.

What the clean root gets besides the checkout is what this workplace's machines have and a fresh Debian
install would not need: the host's CA certificates and pip configuration (PyPI is reached through a
TLS-inspecting proxy here), and Debian's apt sources (the image's are dropped when it is made).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import readme
from tests.system.container import SYSTEM_PATH, host_run, remove_tree
from tests.system.test_system import RELEASES, REPO, WORK, ensure_rootfs, missing_prerequisite

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def quick_start_command() -> str:
    lines = [line for line in readme.block("quick-start") if line and not line.startswith("#")]
    assert lines[1] == "bash .ci/run", lines
    return lines[0]


class Root:
    def __init__(self, path: Path, release: str):
        self.path = path
        self.release = release

    def run(self, command: str, *, user: str = "root", timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`command` by bash in the root (systemd-nspawn without booting it: the host's network), as `user`."""
        home = "/root" if user == "root" else f"/home/{user}"
        argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--pipe", "-D", str(self.path),
                f"--user={user}", f"--chdir={home}", "--setenv=HOME=" + home,
                "--setenv=LANG=C.UTF-8", "--setenv=DEBIAN_FRONTEND=noninteractive",
                *(f"--setenv={name}={os.environ[name]}" for name in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL")
                  if name in os.environ),
                "/bin/bash", "-c", command]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PATH": SYSTEM_PATH})  # fmt: skip


@pytest.fixture(scope="module", params=RELEASES)
def release(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def root(release: str) -> Iterator[Root]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    path = WORK / f"quickstart-{release}-{os.getpid()}"
    remove_tree(path)
    path.mkdir(parents=True)
    try:
        host_run(["tar", "-C", str(path), "-xf", str(ensure_rootfs(release))], timeout=300)
        (path / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
        (path / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {release} {release}-updates\n"
            "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n", encoding="utf-8")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", path / "etc/ssl/certs/ca-certificates.crt")
        local_cas = Path("/usr/local/share/ca-certificates")
        if local_cas.is_dir():  # kept if the bundle is made again
            shutil.copytree(local_cas, path / "usr/local/share/ca-certificates", dirs_exist_ok=True)
        if Path("/etc/pip.conf").exists():
            shutil.copy("/etc/pip.conf", path / "etc/pip.conf")
        shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")
        yield Root(path, release)
    finally:
        remove_tree(path)


def checkout(root: Root, home: str, owner: str) -> None:
    """This repository's files, as a clone would have them (git ls-files), in HOME/dingdifyd."""
    target = root.path / home.lstrip("/") / "dingdifyd"
    target.mkdir(parents=True)
    host_run(["sh", "-c", f"git ls-files -z | tar --null -T - -cf - | tar -C '{target}' -xf -"], timeout=120, cwd=REPO)
    assert root.run(f"chown -R {owner} {home}/dingdifyd").returncode == 0


def assert_demo_ran(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Turn 2" in result.stdout, output[-4000:]


@pytest.mark.step
def test_quick_start_as_root_without_sudo(root: Root) -> None:
    assert root.run("command -v sudo").returncode != 0, "the fresh root should not have sudo"
    checkout(root, "/root", "root:root")
    assert_demo_ran(root.run(f"cd ~/dingdifyd && {quick_start_command()}"))


@pytest.mark.step
def test_quick_start_as_a_user_with_sudo(root: Root) -> None:
    prepared = root.run("apt-get install -y -qq sudo >/dev/null && useradd --create-home --shell /bin/bash dev && "
                        "echo 'dev ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/dev && chmod 0440 /etc/sudoers.d/dev")
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    checkout(root, "/home/dev", "dev:dev")
    result = root.run(f"cd ~/dingdifyd && {quick_start_command()}", user="dev")
    assert_demo_ran(result)
