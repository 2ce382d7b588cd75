"""`FakeDify`: the fake Dify server and the controls tests use (docs/dify.md).

It speaks 0.15.3 or 1.16.1 per app, shaped like the recorded transcripts (tests/fixtures/dify for 0.15.3,
tests/fixtures/dify-1.16.1 for 1.16.1; dialect.py holds how the two write their bytes): the same keys in the same
order, one `data: <json>\\n\\n` chunk per event, `event: ping\\n\\n` keep-alives, the error bodies of each
version. The fake model answers `Echo: <query> | <tail>` word by word; a query with `slow` in it gets forty slow
words, one with `fail500` fails upstream (an `error` event, or a failed workflow run).

What 1.16.1 adds is served for 1.16.1 apps only: chatflow order (`message_end` before `workflow_finished`),
stops and failures without `message_end`, input validation inside the stream, `reasoning_chunk`, human-input
pauses and their form routes (human_input.py), the run events route (`GET /workflow/:run_id/events`, with its
state snapshot, run_events.py) and runs that go on after their client is gone, so that it can be followed there.

The controls register apps by API key, change how they answer (pacing, scripted text, failures, stalls, cuts,
moderation, tool files, concurrency limit), for an app or for its next request only, and read every request,
stop, upload, conversation and workflow run. It can also model a stock Dify's bounded database pool (`db_pool`),
whose exhaustion makes requests hang and then fail with a 500, as bursts do to a real one.

Each endpoint family is a layer of its own, each module adding one on top of those it needs: core.py, files.py,
streaming.py, chat.py and app_info.py, workflow_events.py, human_input.py, workflow.py, run_events.py,
generation.py; this module puts them together and runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.app_info import AppInfoRoutes
from dingdifyd.simulator.dify.dialect import ANSWER_TAILS, DIFY_0_15, check_version
from dingdifyd.simulator.dify.forms import HumanInputNode
from dingdifyd.simulator.dify.generation import Generation
from dingdifyd.simulator.dify.model import (
    CHAT_FORM,
    DIFY_VERSION,
    MODES,
    MODES_1X,
    ONLY_INFO_MODES,
    TEXT_FORM,
    WORKFLOW_MODES,
    Behaviour,
    FakeApp,
)
from dingdifyd.simulator.dify.run_events import RunEventsRoutes

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class FakeDify(Generation, AppInfoRoutes, RunEventsRoutes):
    """The fake server and its test controls. `await start()` binds 127.0.0.1; `base_url` ends in /v1."""

    def __init__(
        self,
        *,
        version: str = DIFY_VERSION,
        ping_interval: float = 10.0,
        info_with_mode: bool = False,
        conversation_error_suffix: bool = False,
        db_pool: int | None = None,
        db_pool_timeout: float = 30.0,
        db_generator_delay: float = 0.2,
    ):
        """`db_pool`: model a stock Dify's database pool (SQLALCHEMY_POOL_SIZE 30 + SQLALCHEMY_MAX_OVERFLOW 10
        = 40 connections; None: unbounded). Every API request holds a connection while it runs, and a
        generation a second one for its stream, taken after the first (the request's session, then the app
        generator's). A request that waits `db_pool_timeout` seconds (SQLALCHEMY_POOL_TIMEOUT, 30) for one
        fails with a 500, as SQLAlchemy's "QueuePool limit ... reached" does: so a burst that takes every
        first connection leaves none for the streams, they all wait, and all fail, like the real one.
        `db_generator_delay`: how long after its request the app generator opens its own session (its setup,
        while the request's greenlet keeps its connection)."""
        super().__init__(
            version=version, ping_interval=ping_interval, info_with_mode=info_with_mode,
            conversation_error_suffix=conversation_error_suffix, db_pool=db_pool, db_pool_timeout=db_pool_timeout,
            db_generator_delay=db_generator_delay,
        )  # fmt: skip
        self._runner: web.AppRunner | None = None

    # --- test controls ------------------------------------------------------------------------------------

    def add_app(
        self,
        api_key: str,
        mode: str,
        *,
        name: str | None = None,
        description: str = "",
        user_input_form: list[dict[str, Any]] | None = None,
        opening_statement: str = "",
        file_upload: bool = True,
        version: str | None = None,
        human_input: HumanInputNode | None = None,
        **behaviour: Any,
    ) -> FakeApp:
        """`mode` as Dify names it (`chat`, `advanced-chat`, ...; 1.x also `agent`, `channel`, `rag-pipeline`,
        which only /info and /parameters serve). `human_input`: a 1.x chatflow or workflow that pauses there."""
        version = check_version(version or self.version)
        if mode not in MODES and not (version != DIFY_0_15 and mode in (*MODES_1X, *ONLY_INFO_MODES)):
            raise ValueError(f"mode must be one of {MODES_1X if version != DIFY_0_15 else MODES}")
        if human_input is not None and (version == DIFY_0_15 or mode not in WORKFLOW_MODES):
            raise ValueError("human input nodes exist in 1.x chatflow and workflow apps only")
        if user_input_form is None:
            user_input_form = TEXT_FORM if mode in ("workflow", "completion") else CHAT_FORM
        app = FakeApp(
            api_key=api_key,
            mode=mode,
            name=name or f"fake-{mode}",
            description=description or f"local fake {mode} app",
            user_input_form=json.loads(json.dumps(user_input_form)),
            opening_statement=opening_statement,
            file_upload=file_upload,
            behaviour=Behaviour(**behaviour),
            version=version,
            human_input=human_input,
        )
        self.apps[api_key] = app
        return app

    def add_default_apps(self) -> dict[str, FakeApp]:
        """One app per mode, keyed `app-fake-<type>` with our app type names (chatbot, agent, ...)."""
        types = {"chatbot": "chat", "agent": "agent-chat", "chatflow": "advanced-chat"}
        types |= {"workflow": "workflow", "completion": "completion"}
        return {kind: self.add_app(f"app-fake-{kind}", mode, name=f"fake-{kind}") for kind, mode in types.items()}

    def configure(self, api_key: str, **changes: Any) -> None:
        """Change how an app answers from now on."""
        app = self.apps[api_key]
        app.behaviour = dataclasses.replace(app.behaviour, **changes)

    def next_request(self, api_key: str, **changes: Any) -> None:
        """Change how the app answers its next generation request only (several calls queue up).

        A request refused before it runs (bad input, unknown conversation, 429) does not use it up.
        """
        dataclasses.replace(Behaviour(), **changes)  # reject unknown names now, not at request time
        self._next.setdefault(api_key, deque()).append(changes)

    @property
    def answer_tail(self) -> str:
        """How the fake model ends an echo, in this fake's default version."""
        return ANSWER_TAILS[self.version]

    # --- server lifecycle ---------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        if host not in LOOPBACK_HOSTS:
            raise ValueError("the fake Dify binds to loopback only")
        self._closing.clear()
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        netloc = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{netloc}:{bound_port}/v1"
        log.info("fake Dify listening on %s", self.base_url)
        return self.base_url

    async def close(self) -> None:
        self._closing.set()  # ends stalls and held-open sockets at once
        for run in self._running.values():
            run.stop.set()  # wakes streams between two tokens; they see the server closing and hang up
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(set(self._background))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDify:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_middleware, self._db_middleware],
                              client_max_size=20 * 1024 * 1024)  # fmt: skip
        app.on_response_prepare.append(self._add_headers)
        routes = [
            *self._app_info_routes(), *self._generation_routes(), *self._workflow_routes(), *self._file_routes(),
            *self._chat_routes(), *self._run_events_routes(), *self._form_routes(),
        ]  # fmt: skip
        app.add_routes(routes)
        return app


async def start_fake_dify(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ping_interval: float = 10.0,
    default_apps: bool = False,
    **options: Any,
) -> FakeDify:
    """Start a fake Dify on loopback and return it (`.base_url`, controls, `await .close()`)."""
    fake = FakeDify(ping_interval=ping_interval, **options)  # version=... among the options
    if default_apps:
        fake.add_default_apps()
    await fake.start(host, port)
    return fake


@contextlib.asynccontextmanager
async def running_fake_dify(**kwargs: Any) -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(**kwargs)
    try:
        yield fake
    finally:
        await fake.close()
