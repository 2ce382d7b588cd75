"""The simulators as a process of their own (`python -m dingdifyd.simulator`) and their /_sim/ control API,
driven over plain HTTP as the system test drives them inside its container, with a real bot answering."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dingdifyd.simulator.control import control_routes
from dingdifyd.simulator.dify import FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import CLIENT_ID, CLIENT_SECRET, running_bot, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True)
    for key in list(fake.apps):
        fake.configure(key, token_delay=0.002, mention_turn=True)
    yield fake
    await fake.close()


@pytest.fixture
async def dingtalk(dify: FakeDify) -> AsyncIterator[FakeDingTalk]:
    fake = FakeDingTalk(ping_interval=None, redeliver_after=None)
    fake.register_app(CLIENT_ID, CLIENT_SECRET, robot_code="robotci")
    fake.extra_routes.extend(control_routes(fake, dify))
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        return response.status, await response.json()


async def card_when_done(http: aiohttp.ClientSession, control: str, track: str) -> dict[str, Any]:
    async with asyncio.timeout(20):
        while True:
            status, card = await call(http, "GET", f"{control}/cards/{track}")
            if status == 200 and card["done"]:
                return card
            await asyncio.sleep(0.02)


async def test_push_message_names_the_card_the_bot_answers_into(tmp_path, dingtalk, dify, http):
    control = dingtalk.base_url + "/_sim"
    async with running_bot(write_config(tmp_path / "bots.yaml", dingtalk, dify)):
        status, pushed = await call(http, "POST", f"{control}/messages", {"text": "hello", "staff_id": "bob"})
        assert status == 200
        expected = hashlib.sha256(f"robotci:{pushed['msg_id']}".encode()).hexdigest()
        assert pushed["out_track_id"] == expected
        card = await card_when_done(http, control, pushed["out_track_id"])
        assert card["text"].startswith("Echo: hello | Turn 1 of this conversation.")
        assert not card["failed"]
        assert card["updates"] >= 1 and card["delivered"]

        _, frame = await call(http, "GET", f"{control}/frames/{pushed['message_id']}")
        assert frame["deliveries"] == 1 and len(frame["acks"]) == 1
        _, redelivered = await call(http, "POST", f"{control}/frames/{pushed['message_id']}/redeliver")
        assert redelivered["deliveries"] == 2
        await dingtalk.wait_for(lambda: len(dingtalk.acks_for(pushed["message_id"])) == 2, 10, "the second ACK")
        _, cards = await call(http, "GET", f"{control}/cards")
        assert [c["out_track_id"] for c in cards] == [pushed["out_track_id"]]

        _, second = await call(http, "POST", f"{control}/messages", {"text": "again", "staff_id": "bob"})
        await card_when_done(http, control, second["out_track_id"])
        _, conversations = await call(http, "GET", f"{control}/dify/conversations")
        assert [(c["user"].rsplit(":", 1)[-1], c["turns"]) for c in conversations] == [("bob", 2)]
        _, requests = await call(http, "GET", f"{control}/dify/requests?path=/chat-messages")
        assert [r["conversation_id"] for r in requests] == [None, conversations[0]["id"]]

        _, connections = await call(http, "GET", f"{control}/connections")
        assert connections["by_app"] == {CLIENT_ID: 1}


async def test_group_message_and_errors(dingtalk, http):
    control = dingtalk.base_url + "/_sim"
    status, pushed = await call(http, "POST", f"{control}/messages",
                                {"text": "hi all", "group": True, "conversation_id": "cidTEAM=="})  # fmt: skip
    assert status == 200 and pushed["conversation_id"] == "cidTEAM=="
    assert (await call(http, "GET", f"{control}/cards/{pushed['out_track_id']}"))[0] == 404
    assert (await call(http, "POST", f"{control}/messages", {"staff_id": "x"}))[0] == 400
    assert (await call(http, "POST", f"{control}/messages", {"text": "x", "client_id": "nope"}))[0] == 400
    assert (await call(http, "POST", f"{control}/frames/unknown/redeliver"))[0] == 404


async def test_simulator_process_serves_until_sigterm(tmp_path: Path, http):
    ready_file = tmp_path / "ready.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd.simulator", "--app", "dingproc:proc-secret",
        "--dify-app", "app-proc-key:workflow", "--ready-file", str(ready_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        ready = json.loads(line)
        assert json.loads(ready_file.read_text()) == ready
        status, state = await call(http, "GET", ready["control"] + "/status")
        assert status == 200 and state["apps"] == ["dingproc"] and state["dify"] == ready["dify"]
        async with http.get(ready["dify"] + "/parameters", headers={"Authorization": "Bearer app-proc-key"}) as r:
            assert r.status == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert not ready_file.exists()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def test_simulator_refuses_bad_arguments():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd.simulator", "--dify-app", "key-without-type",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"API_KEY:TYPE" in stderr
