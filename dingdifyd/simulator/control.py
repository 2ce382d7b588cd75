"""The simulators' HTTP control API, served by the fake DingTalk under `/_sim/`.

`python -m dingdifyd.simulator` runs the fakes in a process of their own (inside the system test's container,
for the demo and the benchmarks); this API is how a test outside that process drives them with plain HTTP:
push a robot message, read a card, redeliver a frame, count connections, and see what the fake Dify recorded.
JSON in, JSON out; errors are `{"error": "..."}` with a 4xx status. Loopback only, like the fakes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dingdifyd.bridge.session import out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator.dify import FakeDify
from dingdifyd.simulator.dingtalk import FakeApp, FakeCard, FakeDingTalk

PREFIX = "/_sim"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def control_routes(dingtalk: FakeDingTalk, dify: FakeDify | None = None) -> list[web.RouteDef]:
    """The routes to add to the fake DingTalk (`dingtalk.extra_routes`) before it starts."""
    api = _ControlApi(dingtalk, dify)
    return [
        web.get(f"{PREFIX}/status", _guarded(api.status)),
        web.post(f"{PREFIX}/messages", _guarded(api.push_message)),
        web.get(f"{PREFIX}/cards", _guarded(api.cards)),
        web.get(f"{PREFIX}/cards/{{out_track_id}}", _guarded(api.card)),
        web.get(f"{PREFIX}/frames/{{message_id}}", _guarded(api.frame)),
        web.post(f"{PREFIX}/frames/{{message_id}}/redeliver", _guarded(api.redeliver)),
        web.get(f"{PREFIX}/connections", _guarded(api.connections)),
        web.get(f"{PREFIX}/dify/conversations", _guarded(api.conversations)),
        web.get(f"{PREFIX}/dify/requests", _guarded(api.dify_requests)),
    ]


def card_state(card: FakeCard) -> dict[str, Any]:
    return {
        "out_track_id": card.out_track_id,
        "text": card.text,
        "done": card.done,
        "failed": card.failed,
        "flow_status": card.flow_status,
        "updates": len(card.timeline) + len(card.param_updates),
        "stream_updates": len(card.timeline),
        "delivered": card.delivered,
    }


class _ControlApi:
    def __init__(self, dingtalk: FakeDingTalk, dify: FakeDify | None):
        self.dingtalk = dingtalk
        self.dify = dify

    async def status(self, request: web.Request) -> web.Response:
        return _ok({
            "dingtalk": self.dingtalk.base_url,
            "dify": self.dify.base_url if self.dify else None,
            "apps": sorted(self.dingtalk.apps),
            "connections": self.dingtalk.connections,
            "cards": len(self.dingtalk.cards),
            "acks": len(self.dingtalk.acks),
        })

    async def push_message(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise ControlError(400, "text: a non-empty string is required")
        app = self._app(body.get("client_id"))
        group = bool(body.get("group", False))
        options: dict[str, Any] = {
            "sender_staff_id": str(body.get("staff_id") or "user001"),
            "sender_nick": str(body.get("nick") or "Tester"),
            "group": group,
            "client_id": app.client_id,
        }
        for key, option in (("conversation_id", "conversation_id"), ("msg_id", "msg_id"),
                            ("title", "conversation_title")):
            if body.get(key):
                options[option] = str(body[key])
        data = self.dingtalk.make_text_message(text, **options)
        message = parse_incoming(data)
        if message is None:  # cannot happen with make_text_message's shape; guards the contract anyway
            raise ControlError(500, "the fake built a message the daemon would not parse")
        frame_id = self.dingtalk.push_message(app.client_id, data)
        return _ok({
            "message_id": frame_id,
            "msg_id": data["msgId"],
            "out_track_id": out_track_id(message),
            "conversation_id": data["conversationId"],
            "client_id": app.client_id,
        })

    async def cards(self, request: web.Request) -> web.Response:
        return _ok([card_state(card) for card in list(self.dingtalk.cards.values())])

    async def card(self, request: web.Request) -> web.Response:
        card = self.dingtalk.cards.get(request.match_info["out_track_id"])
        if card is None:
            raise ControlError(404, "no such card (yet)")
        return _ok(card_state(card))

    async def frame(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        deliveries = self._deliveries(message_id)
        acks = self.dingtalk.acks_for(message_id)
        return _ok({
            "message_id": message_id,
            "deliveries": deliveries,
            "acks": [{"code": ack.code, "response": ack.response} for ack in acks],
        })

    async def redeliver(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        self._deliveries(message_id)  # 404 for a frame never pushed
        self.dingtalk.redeliver(message_id)
        return _ok({"message_id": message_id, "deliveries": self._deliveries(message_id)})

    async def connections(self, request: web.Request) -> web.Response:
        by_app = {client_id: self.dingtalk.connection_count(client_id) for client_id in self.dingtalk.apps}
        return _ok({"count": self.dingtalk.connections, "by_app": by_app,
                    "gateway_opens": self.dingtalk.calls["gateway.open"]})

    async def conversations(self, request: web.Request) -> web.Response:
        dify = self._dify()
        return _ok([
            {"id": c.id, "app": c.app, "user": c.user, "turns": len(c.queries), "created_at": c.created_at}
            for c in dify.conversations.values()
        ])

    async def dify_requests(self, request: web.Request) -> web.Response:
        """The generation requests the fake Dify received, oldest first; `?path=` filters by path suffix."""
        dify = self._dify()
        suffix = request.query.get("path", "")
        items = []
        for recorded in dify.requests:
            if suffix and not recorded.path.endswith(suffix):
                continue
            body = recorded.json if isinstance(recorded.json, dict) else {}
            items.append({
                "method": recorded.method,
                "path": recorded.path,
                "app": recorded.app,
                "user": body.get("user"),
                "conversation_id": body.get("conversation_id") or None,
                "response_mode": body.get("response_mode"),
            })
        return _ok(items)

    def _app(self, client_id: Any) -> FakeApp:
        apps = self.dingtalk.apps
        if client_id is None:
            if len(apps) != 1:
                raise ControlError(400, f"client_id is needed: the simulator knows {len(apps)} apps")
            return next(iter(apps.values()))
        app = apps.get(str(client_id))
        if app is None:
            raise ControlError(400, f"client_id: no app {client_id!r}")
        return app

    def _deliveries(self, message_id: str) -> int:
        try:
            return self.dingtalk.deliveries(message_id)
        except KeyError:
            raise ControlError(404, "no such frame") from None

    def _dify(self) -> FakeDify:
        if self.dify is None:
            raise ControlError(404, "no fake Dify runs in this simulator")
        return self.dify


def _guarded(handler: Handler) -> Handler:
    """ControlError -> `{"error": ...}` with its status."""

    async def route(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ControlError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)

    return route


def _ok(payload: Any) -> web.Response:
    return web.json_response(payload)


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise ControlError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ControlError(400, "the body must be a JSON object")
    return body
