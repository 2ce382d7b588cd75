"""The Stream gateway: `POST /v1.0/gateway/connections/open` gives a ticket, `GET /connect?ticket=` opens the
WebSocket; CALLBACK frames go out, the client's ACKs come back, what is not ACKed is delivered again, SYSTEM frames
ping and disconnect (docs/dingtalk.md#stream-mode). The controls push frames and drop connections."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from dingdifyd.simulator.dingtalk.core import (
    API_GATEWAY_OPEN,
    DingTalkCore,
    api_error,
    now_ms,
    read_json,
)

log = logging.getLogger(__name__)

CHATBOT_TOPIC = "/v1.0/im/bot/messages/get"


@dataclass
class Ack:
    message_id: str
    code: int | None
    message: str
    data: str
    raw: dict[str, Any]

    @property
    def response(self) -> Any:
        """The decoded `data` (e.g. {"response": "OK"}), or None if it is not JSON."""
        try:
            return json.loads(self.data)
        except (TypeError, ValueError):
            return None


@dataclass
class _Ticket:
    client_id: str
    expires_at: float


@dataclass
class _Pushed:
    message_id: str
    client_id: str
    frame: dict[str, Any]
    deliveries: int = 0
    acked: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Connection:
    id: str
    client_id: str
    ws: web.WebSocketResponse
    request: web.Request
    ping_task: asyncio.Task[None] | None = None


class StreamGateway(DingTalkCore):
    def __init__(
        self,
        *,
        ping_interval: float | None = 20.0,
        redeliver_after: float | None = 60.0,
        ticket_ttl: float = 90.0,
        disconnect_grace: float = 10.0,
        rng: random.Random | None = None,
        **options: Any,
    ):
        super().__init__(**options)
        self.ping_interval = ping_interval
        self.redeliver_after = redeliver_after
        self.ticket_ttl = ticket_ttl
        self.disconnect_grace = disconnect_grace
        self._rng = rng or random.Random()
        self.acks: list[Ack] = []
        self.open_requests: list[dict[str, Any]] = []  # gateway open bodies, secret removed
        self._tickets: dict[str, _Ticket] = {}
        self._used_tickets: set[str] = set()
        self._connections: dict[str, _Connection] = {}
        self._pushed: dict[str, _Pushed] = {}
        self._pending: dict[str, deque[_Pushed]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)

    def _stream_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1.0/gateway/connections/open", self._gateway_open),
            web.get("/connect", self._connect),
        ]

    async def _close_stream(self) -> None:
        """Stop redelivery timers, close every connection, end the tasks that send frames."""
        for pushed in self._pushed.values():
            if pushed.timer is not None:
                pushed.timer.cancel()
        for connection in list(self._connections.values()):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001, message=b"server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- controls: frames and connections ---------------------------------------------------------------

    def push_message(self, client_id: str, data: dict[str, Any]) -> str:
        """Send a robot message (a CALLBACK frame of the chatbot topic); returns the frame's messageId."""
        return self.push_callback(client_id, CHATBOT_TOPIC, data)

    def push_callback(self, client_id: str, topic: str, data: dict[str, Any]) -> str:
        app = self._app(client_id)
        message_id = f"{uuid.uuid4().hex[:8]}_{next(self._ids)}_{uuid.uuid4().hex[:10]}"
        frame = {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "appId": app.app_id,
                "connectionId": "",
                "contentType": "application/json",
                "messageId": message_id,
                "time": str(now_ms()),
                "topic": topic,
            },
            "data": json.dumps(data, ensure_ascii=False),
        }
        pushed = _Pushed(message_id, app.client_id, frame)
        self._pushed[message_id] = pushed
        self._deliver(pushed)
        return message_id

    def push_frame(self, client_id: str, frame: dict[str, Any]) -> str:
        """Send a frame exactly as given (a test's odd one) and redeliver it, like any frame, until it is
        ACKed; returns its headers.messageId."""
        app = self._app(client_id)
        message_id = str(frame["headers"]["messageId"])
        pushed = _Pushed(message_id, app.client_id, frame)
        self._pushed[message_id] = pushed
        self._deliver(pushed)
        return message_id

    def push_raw(self, client_id: str, text: str) -> int:
        """Send `text` as-is to every connection of the app (malformed-frame tests); returns how many."""
        connections = self._live(client_id)
        for connection in connections:
            self._spawn(self._send_text(connection, text))
        return len(connections)

    def push_ping(self, client_id: str | None = None) -> list[str]:
        return [self._send_system(connection, "ping", {"opaque": uuid.uuid4().hex})
                for connection in self._live(client_id)]

    def push_disconnect(self, client_id: str | None = None) -> list[str]:
        """SYSTEM disconnect to every connection; the server closes them `disconnect_grace` s later."""
        message_ids = []
        for connection in self._live(client_id):
            reason = {"reason": "connection is expired"}
            message_ids.append(self._send_system(connection, "disconnect", reason))
            self._spawn(self._close_later(connection, self.disconnect_grace))
        return message_ids

    def drop_connections(self, client_id: str | None = None) -> int:
        """Abort the TCP connections without a close frame; returns how many."""
        connections = self._live(client_id)
        for connection in connections:
            transport = connection.request.transport
            if transport is not None:
                transport.abort()
        return len(connections)

    def redeliver(self, message_id: str) -> None:
        """Send a pushed CALLBACK again, same messageId and data, ACKed or not."""
        self._deliver(self._pushed[message_id])

    def deliveries(self, message_id: str) -> int:
        return self._pushed[message_id].deliveries

    @property
    def connections(self) -> int:
        return len(self._connections)

    def connection_count(self, client_id: str) -> int:
        return len(self._live(client_id))

    def acks_for(self, message_id: str) -> list[Ack]:
        return [ack for ack in self.acks if ack.message_id == message_id]

    async def wait_ack(self, message_id: str, timeout: float = 5.0) -> Ack:
        acks = await self.wait_for(lambda: self.acks_for(message_id), timeout, f"the ACK of {message_id}")
        return acks[0]

    async def wait_connections(
        self, count: int = 1, client_id: str | None = None, timeout: float = 5.0
    ) -> None:
        await self.wait_for(lambda: len(self._live(client_id)) >= count, timeout, f"{count} connection(s)")

    # --- the gateway ------------------------------------------------------------------------------------

    async def _gateway_open(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_GATEWAY_OPEN] += 1
        fault = self._take_fault(API_GATEWAY_OPEN)
        if fault is not None:
            return await self._fault_response(fault)
        body = await read_json(request)
        if not isinstance(body, dict):
            return api_error(400, "param.invalid", "body is not a JSON object")
        app = self.apps.get(str(body.get("clientId")))
        if app is None or body.get("clientSecret") != app.client_secret:
            return api_error(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        self.open_requests.append({k: v for k, v in body.items() if k != "clientSecret"})
        ticket = str(uuid.uuid4())
        self._tickets[ticket] = _Ticket(app.client_id, time.monotonic() + self.ticket_ttl)
        self._touch()
        return web.json_response({"endpoint": f"ws://{self.host}:{self.port}/connect", "ticket": ticket})

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ticket_id = request.query.get("ticket", "")
        if ticket_id in self._used_tickets:
            return api_error(403, "ticket.used", "ticket already used")
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None:
            return api_error(401, "ticket.invalid", "unknown ticket")
        self._used_tickets.add(ticket_id)
        if time.monotonic() > ticket.expires_at:
            return api_error(403, "ticket.expired", "ticket expired")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        connection = _Connection(uuid.uuid4().hex, ticket.client_id, ws, request)
        self._connections[connection.id] = connection
        if self.ping_interval:
            connection.ping_task = asyncio.ensure_future(self._ping_loop(connection, self.ping_interval))
        self._touch()
        pending = self._pending.pop(ticket.client_id, deque())
        while pending:
            self._deliver(pending.popleft())
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_client_frame(message.data)
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            self._connections.pop(connection.id, None)
            if connection.ping_task is not None:
                connection.ping_task.cancel()
            self._touch()
        return ws

    def _on_client_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.warning("fake DingTalk: client sent a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        headers = frame.get("headers")
        headers = headers if isinstance(headers, dict) else {}
        message_id = str(headers.get("messageId", ""))
        code = frame.get("code")
        self.acks.append(Ack(message_id, code if isinstance(code, int) else None,
                             str(frame.get("message", "")), str(frame.get("data", "")), frame))
        pushed = self._pushed.get(message_id)
        if pushed is not None:
            pushed.acked = True
            if pushed.timer is not None:
                pushed.timer.cancel()
                pushed.timer = None
        self._touch()

    def _deliver(self, pushed: _Pushed) -> None:
        connections = self._live(pushed.client_id)
        if not connections:
            # DingTalk keeps it for the next connection of the app.
            self._pending.setdefault(pushed.client_id, deque()).append(pushed)
            return
        connection = self._rng.choice(connections)
        frame = dict(pushed.frame, headers=dict(pushed.frame["headers"], connectionId=connection.id))
        pushed.deliveries += 1
        self._spawn(self._send_text(connection, json.dumps(frame, ensure_ascii=False)))
        if pushed.timer is not None:
            pushed.timer.cancel()
        if self.redeliver_after is not None and not pushed.acked:
            pushed.timer = asyncio.get_running_loop().call_later(
                self.redeliver_after, self._redeliver_unacked, pushed.message_id
            )

    def _redeliver_unacked(self, message_id: str) -> None:
        pushed = self._pushed[message_id]
        pushed.timer = None
        if not pushed.acked:
            self._deliver(pushed)

    def _send_system(self, connection: _Connection, topic: str, data: dict[str, Any]) -> str:
        message_id = f"sys-{topic}-{next(self._ids)}"
        frame = {
            "specVersion": "1.0",
            "type": "SYSTEM",
            "headers": {"contentType": "application/json", "messageId": message_id, "time": str(now_ms()),
                        "topic": topic},
            "data": json.dumps(data),
        }
        self._spawn(self._send_text(connection, json.dumps(frame)))
        return message_id

    async def _send_text(self, connection: _Connection, text: str) -> None:
        try:
            await connection.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("fake DingTalk: send to connection %s failed: %s", connection.id, exc)

    async def _ping_loop(self, connection: _Connection, interval: float) -> None:
        while not connection.ws.closed:
            await asyncio.sleep(interval)
            if not connection.ws.closed:
                self._send_system(connection, "ping", {"opaque": uuid.uuid4().hex})

    async def _close_later(self, connection: _Connection, delay: float) -> None:
        await asyncio.sleep(delay)
        if not connection.ws.closed:
            await connection.ws.close()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _live(self, client_id: str | None) -> list[_Connection]:
        return [c for c in self._connections.values()
                if (client_id is None or c.client_id == client_id) and not c.ws.closed]
