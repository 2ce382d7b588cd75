"""Shared pieces for the end-to-end tests: config files pointing at the simulators, and a bot runtime in a task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dingdifyd import config
from dingdifyd.simulator import configfile
from dingdifyd.simulator.dify import ANSWER_TAIL, FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from dingdifyd.worker.runtime import BotRuntime

CLIENT_ID = "dingbridgetest"
CLIENT_SECRET = "dt-secret-NEVER-LOGGED-1234567890"
TEMPLATE = "tpl-bridge.schema"


def echo(query: str, dify: FakeDify | None = None) -> str:
    """The fake Dify's default answer to `query` (its model's words differ with the version)."""
    return f"Echo: {query} | {dify.answer_tail if dify is not None else ANSWER_TAIL}"


def dify_key(app_type: str) -> str:
    """The fake Dify's default apps are keyed by our app type names."""
    return f"app-fake-{app_type}"


def write_config(
    path: Path,
    fake_dingtalk: FakeDingTalk,
    fake_dify: FakeDify,
    *,
    bots: list[dict[str, Any]] | None = None,
    **top: Any,
) -> Path:
    """A config file for the simulators: one chatbot bot unless `bots` says otherwise."""
    defaults: dict[str, Any] = {
        "dingtalk_ai_card_template_id": TEMPLATE,
        "card_update_interval": 0.05,
        "dify_idle_timeout": 5,
        "stop_timeout": 5,
    }
    return configfile.write_config(
        path, dingtalk_url=fake_dingtalk.base_url, dify_url=fake_dify.base_url, state_dir=path.parent / "state",
        bots=bots or [bot_entry()], **{**defaults, **top},
    )  # fmt: skip


def bot_entry(name: str = "helpdesk", app_type: str = "chatbot", **overrides: Any) -> dict[str, Any]:
    return configfile.bot_entry(
        name,
        client_id=overrides.pop("client_id", CLIENT_ID),
        client_secret=overrides.pop("client_secret", CLIENT_SECRET),
        app_type=app_type,
        dify_key=overrides.pop("dify_key", dify_key(app_type)),
        **overrides,
    )


@contextlib.asynccontextmanager
async def running_bot(config_path: Path, name: str = "helpdesk", **runtime_options: Any) -> AsyncIterator[BotRuntime]:
    """Run one bot's runtime in this event loop, connected to the fake DingTalk, and stop it gracefully.
    `runtime_options` go to BotRuntime (test knobs such as a shorter card back-off)."""
    loaded = config.load(config_path, environ={})
    runtime = BotRuntime(loaded.bot(name), loaded, **runtime_options)
    task = asyncio.create_task(runtime.run())
    connected = asyncio.create_task(runtime.connected.wait())
    await asyncio.wait({task, connected}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not connected.done():
        connected.cancel()
        if task.done():
            task.result()  # raises what stopped it
        task.cancel()
        raise AssertionError("the bot did not connect to the fake DingTalk")
    try:
        yield runtime
    finally:
        runtime.request_stop()
        done, _ = await asyncio.wait({task}, timeout=30)
        assert task in done, "the bot did not stop"
        task.result()
