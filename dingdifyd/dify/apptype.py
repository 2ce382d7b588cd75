"""Is the configured `dify_app_type` the kind of app the key belongs to? Asked at bot start and by `doctor`.

A key of a workflow app used as a chatbot makes every message fail with `400 not_chat_app`; better to say so
once, at start, naming the key to fix. Late Dify 1.x names the app's mode in `GET /info`. Older servers (0.15
included) do not, so the stop route of the configured kind is asked with a task id that cannot exist: Dify
checks the app's mode before anything else there (`not_chat_app`, `not_workflow_app`, `app_unavailable`) and
answers success for an unknown task, so the probe runs nothing and costs no tokens. Only when it is refused
are the generation routes asked (`resolve_app_type`) to name the app's real kind.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from dingdifyd.apptypes import APP_TYPE_BY_MODE, AUTO, CHAT_FAMILY, UNSUPPORTED_MODES, family
from dingdifyd.dify.client import DifyClient
from dingdifyd.errors import ConfigError, DifyAuthError, DifyError, UnsupportedAppMode

log = logging.getLogger(__name__)

PROBE_USER = "dingdifyd-probe"
ROUTE_MISMATCH_CODES = ("not_chat_app", "not_completion_app", "not_workflow_app", "app_unavailable")
START_CHECK_TIMEOUT = 15.0  # a Dify slow to answer delays the bot's start no longer than this (all its apps)
CHAT_ROUTE_APP = "chat-route app (chatbot, agent or chatflow: this Dify does not say which)"


@dataclass(frozen=True)
class AppTypeReport:
    configured: str
    actual: str | None  # our name for the app's kind; None when an older Dify only confirmed the family
    mode: str | None  # Dify's mode as `GET /info` reported it (late 1.x)
    app_name: str

    @property
    def matches(self) -> bool:
        return self.configured == AUTO or self.actual is None or family(self.actual) == family(self.configured)

    @property
    def only_family_known(self) -> bool:
        """An older Dify (no mode in `GET /info`) confirmed the route family only: a chat-route app may be a
        chatbot, an agent or a chatflow, and nothing here can tell which."""
        return self.mode is None and self.actual is not None and family(self.actual) == CHAT_FAMILY

    def describe(self) -> str:
        if self.only_family_known:
            return CHAT_ROUTE_APP
        kind = self.actual or family(self.configured)
        mode = f", mode {self.mode}" if self.mode else ""
        return f"{kind} app{mode}"


async def inspect_app(client: DifyClient, configured: str) -> AppTypeReport:
    """What kind of app the client's key belongs to. Raises DifyAuthError for a refused key, UnsupportedAppMode
    for an app no chat can use (1.x `channel`, `rag-pipeline`), DifyError when Dify cannot be asked."""
    info = await client.info()
    mode = info.get("mode") if isinstance(info.get("mode"), str) else None
    if mode in UNSUPPORTED_MODES:
        raise UnsupportedAppMode(mode)
    name = str(info.get("name") or "")
    actual = APP_TYPE_BY_MODE.get(mode or "")
    if actual is None and configured == AUTO:
        actual = await client.resolve_app_type()
    elif actual is None:
        try:
            await client.stop(f"dingdifyd-probe-{uuid.uuid4()}", PROBE_USER)
        except DifyError as exc:
            if exc.status != 400 or exc.code not in ROUTE_MISMATCH_CODES:
                raise
            actual = await client.resolve_app_type()
    return AppTypeReport(configured=configured, actual=actual, mode=mode, app_name=name)


def mismatch_problem(where: str, report: AppTypeReport) -> str:
    right = report.actual or "auto"
    return (
        f"{where}.dify_app_type: {report.configured!r}, but its key belongs to a {report.describe()}; "
        f"set dify_app_type: {right} (or auto)"
    )


def unsupported_mode_problem(where: str, exc: UnsupportedAppMode) -> str:
    return (
        f"{where}.dify_app_api_key: the key belongs to a Dify {exc.mode} app, which cannot answer chat messages; "
        "use the key of a chatbot, agent, chatflow, workflow or completion app"
    )


def refused_key_problem(where: str, exc: DifyAuthError) -> str:
    return (
        f"{where}.dify_app_api_key: refused by Dify (HTTP {exc.status} {exc.code or ''}); "
        "use the app's API key (Dify: the app > API Access > API Key)"
    ).replace("  ", " ")


async def check_at_start(apps: Sequence[tuple[str, DifyClient]], timeout: float = START_CHECK_TIMEOUT) -> None:
    """Before a bot takes messages: every key accepted and of the configured kind, `auto` resolved.

    The apps are asked at the same time, under one deadline for all: a bot with several slow apps starts no
    later than one slow app would make it. Raises ConfigError naming each key to fix (the bot process then
    exits 78). A Dify that cannot be reached, or not in time, is not a reason to refuse to start: that app's
    check is logged and skipped, and `auto` is resolved on first use.
    """
    tasks = {asyncio.create_task(_check(where, client)): where for where, client in apps}
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
        log.warning("%s: the Dify app could not be checked at start (no answer in time); going on", tasks[task])
    if pending:
        await asyncio.wait(pending)
    problems = [problem for task in tasks if task in done and (problem := task.result()) is not None]
    if problems:
        raise ConfigError(problems)


async def _check(where: str, client: DifyClient) -> str | None:
    """The configuration problem of one app, or None (also when Dify could not be asked: logged)."""
    configured = client.app_type
    try:
        report = await inspect_app(client, configured)
    except DifyAuthError as exc:
        return refused_key_problem(where, exc)
    except UnsupportedAppMode as exc:
        return unsupported_mode_problem(where, exc)
    except DifyError as exc:
        log.warning("%s: the Dify app could not be checked at start (%s); going on", where, type(exc).__name__)
        return None
    if not report.matches:
        return mismatch_problem(where, report)
    if configured == AUTO and report.actual is not None:
        client.app_type = report.actual
        log.info("%s: Dify app type %s (auto, %s)", where, report.actual, report.describe())
    return None
