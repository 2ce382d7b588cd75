"""A bot process's start: heartbeats from the first moment, the Dify apps checked at once under one deadline,
and a stop request heeded meanwhile. Against a loopback "Dify" that never answers, and the fake DingTalk."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web

from dingdifyd import config
from dingdifyd.errors import EX_OK
from dingdifyd.simulator.dify import FakeDify
from dingdifyd.worker.heartbeat import ParentChannel
from dingdifyd.worker.runtime import BotRuntime
from tests.integration.harness import bot_entry, write_config

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0  # far less than the start checks' own deadline (15 s): what happens here happens before it


class SilentDify:
    """Accepts every request and never answers it (until closed): a Dify whose workers are all stuck."""

    def __init__(self) -> None:
        self.pending = 0
        self.most_pending = 0
        self._release = asyncio.Event()
        self.base_url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.pending += 1
        self.most_pending = max(self.most_pending, self.pending)
        try:
            await self._release.wait()
            return web.json_response({})
        finally:
            self.pending -= 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SilentDify]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        try:
            yield self
        finally:
            self._release.set()
            await runner.cleanup()


async def eventually(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_bot_with_stuck_dify_apps_beats_checks_them_at_once_and_stops_when_asked(tmp_path, dingtalk):
    silent = SilentDify()
    async with silent.running():
        routes = [
            {"name": f"r{index}", "conversation_ids": [f"cid{index}=="], "dify_app_type": "chatbot",
             "dify_app_api_key": f"app-route-{index}"}
            for index in range(2)
        ]  # fmt: skip
        stuck_dify = cast(FakeDify, SimpleNamespace(base_url=silent.base_url))  # all write_config reads of it
        path = write_config(tmp_path / "c.yaml", dingtalk, stuck_dify, bots=[bot_entry(routes=routes)],
                            heartbeat_timeout=1)  # fmt: skip
        loaded = config.load(path, environ={})
        reader, writer = multiprocessing.Pipe(duplex=False)
        runtime = BotRuntime(loaded.bot("helpdesk"), loaded, ParentChannel(writer))
        task = asyncio.create_task(runtime.run())
        try:
            # the supervisor hears from the bot while its Dify apps are being checked
            assert await asyncio.to_thread(reader.poll, WAIT), "no heartbeat while the Dify apps are checked"
            assert reader.recv()[0] == "heartbeat"
            # the three apps (the bot's, two routes') are asked at the same time, not one after another
            await eventually(lambda: silent.most_pending >= 3, "the three apps to be asked at once")
            assert not runtime.connected.is_set()  # still checking
            runtime.request_stop()  # SIGTERM during the start
            done, _ = await asyncio.wait({task}, timeout=WAIT)
            assert task in done, "the bot did not stop while its start checks hung"
            assert task.result() == EX_OK
        finally:
            task.cancel()
            reader.close()
            writer.close()
