"""Shared pieces for the end-to-end tests: config files pointing at the simulators, and a bot runtime in a task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from dingdifyd import config
from dingdifyd.simulator.fake_dify import FakeDify
from dingdifyd.simulator.fake_dingtalk import FakeDingTalk
from dingdifyd.worker import BotRuntime

CLIENT_ID = "dingbridgetest"
CLIENT_SECRET = "dt-secret-NEVER-LOGGED-1234567890"
TEMPLATE = "tpl-bridge.schema"


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
    doc: dict[str, Any] = {
        "dify_open_api_url": fake_dify.base_url,
        "dingtalk_api_base": fake_dingtalk.base_url,
        "dingtalk_oapi_base": fake_dingtalk.base_url,
        "dingtalk_ai_card_template_id": TEMPLATE,
        "state_dir": str(path.parent / "state"),
        "card_update_interval": 0.05,
        "dify_idle_timeout": 5,
        "stop_timeout": 5,
        **top,
    }
    doc["bots"] = bots or [bot_entry()]
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    path.chmod(0o600)
    return path


def bot_entry(name: str = "helpdesk", app_type: str = "chatbot", **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "dingtalk_app_client_id": overrides.pop("client_id", CLIENT_ID),
        "dingtalk_app_client_secret": overrides.pop("client_secret", CLIENT_SECRET),
        "dify_app_type": app_type,
        "dify_app_api_key": overrides.pop("dify_key", dify_key(app_type)),
        "handler": "DifyAiCardBotHandler",
        **overrides,
    }


@contextlib.asynccontextmanager
async def running_bot(config_path: Path, name: str = "helpdesk") -> AsyncIterator[BotRuntime]:
    """Run one bot's runtime in this event loop, connected to the fake DingTalk, and stop it gracefully."""
    loaded = config.load(config_path, environ={})
    runtime = BotRuntime(loaded.bot(name), loaded)
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
        done, _ = await asyncio.wait({task}, timeout=15)
        assert task in done, "the bot did not stop"
        task.result()
