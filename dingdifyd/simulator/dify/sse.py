"""How a run's events reach their listeners: the SSE writer of the client that started the run (with its
pings), and the subscriptions of 1.x's run events route."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.dialect import Dialect


class EventWriter:
    """Writes a run's SSE chunks: to the client that started it, as long as it is there, and to the run's event
    subscribers (1.x's events route). A lock keeps the ping task and the answer from interleaving in a chunk."""

    def __init__(
        self,
        response: web.StreamResponse | None,
        dialect: Dialect,
        publish: Callable[[dict[str, Any]], None] = lambda obj: None,
    ):
        self._response = response
        self._dialect = dialect
        self._publish = publish
        self._lock = asyncio.Lock()
        self._ping_task: asyncio.Task[None] | None = None
        self.lost: str | None = None  # how the client was lost (a cut, a stall, a clean end, it left), 1.x only

    @property
    def attached(self) -> bool:
        return self._response is not None and self.lost is None

    async def send(self, obj: dict[str, Any]) -> None:
        self._publish(obj)
        if self.attached:
            try:
                await self._write(self._dialect.chunk(obj))
            except ConnectionError:
                if not self._dialect.is_1x:
                    raise  # 0.15: a run ends with its client
                self.lost = "gone"  # 1.x: the run goes on; its events route still has it

    async def _write(self, data: bytes) -> None:
        assert self._response is not None
        async with self._lock:
            await self._response.write(data)

    def detach(self, how: str) -> None:
        self.lost = how

    async def end_client(self) -> None:
        """End the client's body cleanly (a polite proxy giving up), before detaching it."""
        if self.attached:
            assert self._response is not None
            async with self._lock:
                await self._response.write_eof()

    @property
    def transport(self) -> Any:
        request = getattr(self._response, "_req", None)  # aiohttp's own link to the request: the way to its socket
        return request.transport if request is not None else None

    def start_pings(self, interval: float) -> None:
        self._ping_task = asyncio.create_task(self._ping_loop(interval))

    async def stop_pings(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ping_task
            self._ping_task = None

    async def _ping_loop(self, interval: float) -> None:
        with contextlib.suppress(ConnectionError):
            while self.attached:
                await asyncio.sleep(interval)
                if self.attached:
                    await self._write(b"event: ping\n\n")


@dataclass
class Subscription:
    """A client of the run events route: what it is sent, and when its stream ends."""

    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    continue_on_pause: bool = False
