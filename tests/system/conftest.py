"""The system test runs only when asked for (`pytest -m system`, as .ci/run does), and its steps in order, once
per Debian release: a failed step skips the later steps of the same release only."""

from __future__ import annotations

import re
from collections.abc import Generator
from typing import Any

import pytest

from tests.system.container import diagnostics


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "step: a step of the system test; once one fails, the later ones skip")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expression = config.getoption("markexpr") or ""
    if re.search(r"(?<!not )\bsystem\b", expression):
        return
    skip = pytest.mark.skip(reason="system test: run `pytest -m system` as root (.ci/run does); it builds the "
                                   ".debs and boots containers")
    for item in items:
        if item.get_closest_marker("system"):
            item.add_marker(skip)


def _scope(item: pytest.Item) -> str:
    """What a failed step spoils: the steps of the same module and release."""
    callspec = getattr(item, "callspec", None)
    release = callspec.params.get("release", "") if callspec else ""
    return f"{item.module.__name__ if item.module else ''}[{release}]"


def pytest_runtest_setup(item: pytest.Item) -> None:
    failed = diagnostics["failed_steps"].get(_scope(item))
    if failed and item.get_closest_marker("step"):
        pytest.skip(f"an earlier step failed: {failed}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or not item.get_closest_marker("step"):
        return
    diagnostics["failed_steps"].setdefault(_scope(item), item.name)
    container = diagnostics["container"]
    if container is None:
        return
    if container.init_pid:
        report.sections.append(("container journal, dingdifyd@ci", container.journal("-u", "dingdifyd@ci")))
        report.sections.append(("container journal, last 150 lines", container.journal("-n", "150")))
    else:
        report.sections.append(("systemd-nspawn output", container.boot_log()))
