"""Shared pieces for the end-to-end tests: a fake DingTalk that knows the test app, config files pointing at the
simulators, a bot runtime in a task, and messages sent as a person would send them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

from dingdifyd import config
from dingdifyd.bridge.session import out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator import configfile
from dingdifyd.simulator.dify import ANSWER_TAIL, FakeDify
from dingdifyd.simulator.dingtalk import FakeCard, FakeDingTalk
from dingdifyd.worker.runtime import BotRuntime

CLIENT_ID = "dingbridgetest"
CLIENT_SECRET = "dt-secret-NEVER-LOGGED-1234567890"
TEMPLATE = "tpl-bridge.schema"


def echo(query: str, dify: FakeDify | None = None) -> str:
    """The fake Dify's default answer to `query` (its model's words differ with the version)."""
    return f"Echo: {query} | {dify.answer_tail if dify is not None else ANSWER_TAIL}"


def fake_dingtalk(**options: Any) -> FakeDingTalk:
    """A fake DingTalk (not started: `async with` it) that knows the test app; no pings and no redelivery unless
    `options` ask for them."""
    fake = FakeDingTalk(**{"ping_interval": None, "redeliver_after": None, **options})
    fake.register_app(CLIENT_ID, CLIENT_SECRET)
    return fake


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


class Pushed(NamedTuple):
    frame_id: str  # the Stream frame's messageId (its ACKs and deliveries are counted by it)
    track: str  # the outTrackId of the message's card


def push_data(dingtalk: FakeDingTalk, data: dict[str, Any], *, client_id: str = CLIENT_ID) -> Pushed:
    """Send a robot message payload to the app's connection."""
    message = parse_incoming(data)
    assert message is not None
    return Pushed(dingtalk.push_message(client_id, data), out_track_id(message))


def push_text(dingtalk: FakeDingTalk, text: str, *, client_id: str = CLIENT_ID, **message: Any) -> Pushed:
    """Send a text message as a person would; `message`: make_message's options (sender, group, ...)."""
    return push_data(dingtalk, dingtalk.make_text_message(text, client_id=client_id, **message), client_id=client_id)


def push(dingtalk: FakeDingTalk, text: str, *, client_id: str = CLIENT_ID, **message: Any) -> str:
    """Send a text message as a person would; the outTrackId of its card."""
    return push_text(dingtalk, text, client_id=client_id, **message).track


async def deliver(
    dingtalk: FakeDingTalk, data: dict[str, Any], *, client_id: str = CLIENT_ID, timeout: float = 20.0
) -> FakeCard:
    """Send a robot message payload; its card, once final."""
    return await dingtalk.wait_card_final(push_data(dingtalk, data, client_id=client_id).track, timeout=timeout)


async def ask(
    dingtalk: FakeDingTalk, text: str, *, client_id: str = CLIENT_ID, timeout: float = 20.0, **message: Any
) -> FakeCard:
    """Send a text message as a person would; its card, once final."""
    return await dingtalk.wait_card_final(push(dingtalk, text, client_id=client_id, **message), timeout=timeout)
