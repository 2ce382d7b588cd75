"""`FakeDingTalk`: one aiohttp app on 127.0.0.1 that is at the same time the fake server and the controller tests
drive: push messages, inject failures, read what the daemon did (cards, replies, ACKs) and wait for it.

Each endpoint family is a layer of its own (stream.py, oauth.py, cards.py, media.py, robot.py, and the QR
registration in registration.py); this module puts them together and runs them.
"""

from __future__ import annotations

import logging
import random

from aiohttp import web

from dingdifyd.simulator.dingtalk.cards import CardRoutes
from dingdifyd.simulator.dingtalk.registration import FakeRegistration
from dingdifyd.simulator.dingtalk.robot import RobotRoutes
from dingdifyd.simulator.dingtalk.stream import StreamGateway

log = logging.getLogger(__name__)


class FakeDingTalk(StreamGateway, CardRoutes, RobotRoutes):
    """The fake DingTalk server and its controller. Bind: 127.0.0.1 only; `port=0` picks a free port."""

    def __init__(
        self,
        *,
        port: int = 0,
        token_expire_in: int = 7200,
        ping_interval: float | None = 20.0,
        redeliver_after: float | None = 60.0,
        rate_limit: float | None = 20.0,
        max_stream_content: int = 100_000,
        ticket_ttl: float = 90.0,
        disconnect_grace: float = 10.0,
        templates: set[str] | None = None,
        rng: random.Random | None = None,
    ):
        super().__init__(
            port=port, token_expire_in=token_expire_in, ping_interval=ping_interval, redeliver_after=redeliver_after,
            rate_limit=rate_limit, max_stream_content=max_stream_content, ticket_ttl=ticket_ttl,
            disconnect_grace=disconnect_grace, templates=templates, rng=rng,
        )  # fmt: skip
        self._runner: web.AppRunner | None = None
        # more routes served next to DingTalk's, added before start() (the simulator's /_sim/ control API)
        self.extra_routes: list[web.AbstractRouteDef] = []
        # the QR-code app registration on the oapi side (dingdifyd setup)
        self.registration = FakeRegistration(self.register_app)

    async def start(self) -> FakeDingTalk:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_routes([
            *self._stream_routes(), *self._token_routes(), *self._card_routes(), *self._media_routes(),
            *self._robot_routes(), *self.registration.routes(),
        ])  # fmt: skip
        app.router.add_routes(self.extra_routes)
        # No access log: its lines would carry session= and access_token= query strings.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("fake DingTalk listening on %s", self.base_url)
        return self

    async def close(self) -> None:
        self._closing.set()
        await self._close_stream()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDingTalk:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
