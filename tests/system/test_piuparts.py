"""piuparts on the package of each release: installed into a fresh debootstrapped root of the release with its
dependencies from Debian's archive, removed and purged, with piuparts' checks (files left behind or changed,
broken symlinks, maintainer scripts' errors). Its chroot has no running systemd: the instance handling is
tested by test_system.py on a booted one. There is no upgrade test here: no earlier version is in Debian's
archive (test_system.py upgrades through the project's own repository)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.system.container import SYSTEM_PATH
from tests.system.test_system import DEBS, RELEASES, WORK, deb_name, ensure_debs

MIRROR = os.environ.get("DINGDIFYD_DEBIAN_MIRROR", "http://deb.debian.org/debian")

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


@pytest.mark.parametrize("release", RELEASES)
def test_piuparts_installs_and_purges_cleanly(release: str) -> None:
    if os.geteuid() != 0 or shutil.which("piuparts", path=SYSTEM_PATH) is None:
        pytest.skip("needs root and piuparts (apt-get install piuparts)")
    ensure_debs(release)
    log = WORK / f"piuparts-{release}.log"
    WORK.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["piuparts", "--distribution", release, "--mirror", MIRROR, "--no-eatmydata", "--warn-on-others",
         "--log-file", str(log), str(DEBS / deb_name(release))],
        capture_output=True, text=True, timeout=840, env={**os.environ, "PATH": SYSTEM_PATH},
    )  # fmt: skip
    output = log.read_text(errors="replace") if log.exists() else result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "PASS: Installation and purging test." in output
    assert "PASS: All tests." in output
