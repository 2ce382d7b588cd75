"""The packaging's files agree with the code: every config key documented, one version, consistent units."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import pytest
import setuptools

from dingdifyd import __version__, config
from dingdifyd.config.settings import default_of, known_keys

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "example.yaml"
MAN_CONFIG = REPO / "packaging" / "man" / "dingdifyd.yaml.5"
TEMPLATE_UNIT = REPO / "packaging" / "systemd" / "dingdifyd@.service"
PLAIN_UNIT = REPO / "packaging" / "systemd" / "dingdifyd.service"
DEBIAN = REPO / "packaging" / "debian"


def documented_keys() -> set[str]:
    return set(known_keys(config.SETTINGS))


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every directive, in order; comments and blank lines dropped."""
    entries, section = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        entries.append((section, key, value))
    return entries


def service(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for section, key, value in unit_entries(path):
        if section == "[Service]":
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("document", [EXAMPLE, MAN_CONFIG], ids=lambda p: p.name)
def test_every_config_key_is_documented(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    missing = sorted(key for key in documented_keys() if not re.search(rf"\b{re.escape(key)}\b", text))
    assert not missing, f"{document.name} does not explain: {', '.join(missing)}"


def test_example_config_is_valid() -> None:
    loaded = config.load(EXAMPLE, environ={})
    assert [bot.name for bot in loaded.bots] == ["helpdesk"]
    assert not [w for w in loaded.warnings if "unknown key" in w]


def test_debian_changelog_has_the_package_version() -> None:
    first = (DEBIAN / "changelog").read_text(encoding="utf-8").splitlines()[0]
    match = re.match(r"dingdifyd \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1) == __version__, "packaging/debian/changelog needs an entry for the new version"


def test_template_unit_has_what_the_daemon_needs() -> None:
    unit = service(TEMPLATE_UNIT)
    for key, value in (("Type", "notify"), ("NotifyAccess", "main"), ("Restart", "on-failure"),
                       ("RestartPreventExitStatus", "78"), ("KillMode", "mixed"), ("User", "dingdifyd"),
                       ("StateDirectory", "dingdifyd/%i"), ("EnvironmentFile", "-/etc/dingdifyd/dingdifyd.env"),
                       ("ExecStart", "/usr/bin/dingdifyd run -c /etc/dingdifyd/%i.yaml")):
        assert unit.get(key) == [value], key
    check, signal = unit["ExecReload"]
    assert check.endswith("check-config-for-reload /etc/dingdifyd/%i.yaml")
    assert signal == "/bin/kill -HUP $MAINPID"
    helper = (REPO / "packaging" / "systemd" / "check-config-for-reload").read_text(encoding="utf-8")
    assert 'exec /usr/bin/dingdifyd check-config -q -c "$1"' in helper
    assert "WatchdogSec" in unit


def test_memory_is_bounded_and_no_core_is_dumped() -> None:
    unit = service(TEMPLATE_UNIT)
    [memory_max] = unit["MemoryMax"]
    assert memory_max.endswith(("M", "G")) and float(memory_max[:-1]) > 0
    assert unit["OOMPolicy"] == ["continue"]  # an OOM-killed bot process is the supervisor's to restart
    assert unit["LimitCORE"] == ["0"]  # a core dump would hold secrets and message text


def test_the_start_window_fits_the_start_timeout() -> None:
    default_start = default_of("start_timeout")
    [timeout] = service(TEMPLATE_UNIT)["TimeoutStartSec"]
    assert float(timeout.removesuffix("s")) >= default_start + 30  # READY=1 long before systemd gives up


def test_stop_timeout_fits_the_drain_bound() -> None:
    default_stop = default_of("stop_timeout")
    [timeout] = service(TEMPLATE_UNIT)["TimeoutStopSec"]
    assert timeout.endswith("s")
    # the supervisor gives the bots stop_timeout + 1 s, then SIGKILLs them: systemd must wait longer
    assert float(timeout[:-1]) >= default_stop + 5


def test_plain_unit_is_the_template_for_dingdifyd_yaml() -> None:
    differ = {"Description", "SyslogIdentifier", "Conflicts"}
    template = [(s, k, v.replace("%i", "dingdifyd")) for s, k, v in unit_entries(TEMPLATE_UNIT) if k not in differ]
    plain = [entry for entry in unit_entries(PLAIN_UNIT) if entry[1] not in differ]
    assert plain == template
    assert ("[Unit]", "Conflicts", "dingdifyd@dingdifyd.service") in unit_entries(PLAIN_UNIT)


def test_service_account_is_the_one_the_package_creates() -> None:
    sysusers = (DEBIAN / "dingdifyd.sysusers").read_text(encoding="utf-8")
    [line] = [line for line in sysusers.splitlines() if line.startswith("u ")]
    assert line.split()[1] == config.DAEMON_GROUP == service(TEMPLATE_UNIT)["User"][0]


def test_lock_pins_every_dependency_with_a_hash() -> None:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    required = parser["options"]["install_requires"].split() + parser["options.extras_require"]["redis"].split()
    names = {re.split(r"[<>=!~ ]", requirement)[0].lower().replace("_", "-") for requirement in required}
    lock = (REPO / "packaging" / "requirements.txt").read_text(encoding="utf-8")
    # one hash per artifact a build may pick (Python of each Debian release, each architecture)
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)(?: \\\n    --hash=sha256:[0-9a-f]{64})+$", lock, re.MULTILINE)
    pinned = {name.lower().replace("_", "-") for name, _ in pins}
    assert names <= pinned, f"not in packaging/requirements.txt: {sorted(names - pinned)}"
    requirement_lines = [line for line in lock.splitlines() if line and not line.startswith(("#", " "))]
    assert len(requirement_lines) == len(pins), "every requirement is pinned with ==, with a hash"


def test_packaged_files_exist() -> None:
    for line in (DEBIAN / "dingdifyd.install").read_text(encoding="utf-8").splitlines():
        assert (REPO / line.split()[0]).is_file(), line
    for line in (DEBIAN / "dingdifyd.manpages").read_text(encoding="utf-8").splitlines():
        assert (REPO / line).is_file(), line


@pytest.mark.parametrize("script", ["packaging/systemd/check-config-for-reload", "packaging/build-deb",
                                    "packaging/systemd/try-restart-checked", "packaging/build-repo",
                                    "packaging/build-image",
                                    "tests/system/make-rootfs", "packaging/debian/dingdifyd.postinst",
                                    "packaging/debian/dingdifyd.prerm", "packaging/debian/dingdifyd.postrm"])
def test_shell_scripts_parse(script: str) -> None:
    path = REPO / script
    shell = "bash" if path.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash") else "sh"
    result = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_every_folder_of_the_package_is_a_package_the_wheel_takes() -> None:
    """setup.cfg's `find:` takes only folders with an `__init__.py`: one without works in a checkout (a namespace
    package) and is missing from the wheel, so from the .deb."""
    package = REPO / "dingdifyd"
    folders = {path.parent for path in package.rglob("*.py") if "__pycache__" not in path.parts}
    assert [str(f.relative_to(REPO)) for f in sorted(folders) if not (f / "__init__.py").exists()] == []
    found = set(setuptools.find_packages(str(REPO), include=["dingdifyd", "dingdifyd.*"]))
    assert {".".join(f.relative_to(REPO).parts) for f in folders} <= found
