"""What every part of the fake DingTalk shares: the apps it knows, the API names, injected failures, change
notification and waiting, and the shape of DingTalk's OpenAPI errors (docs/dingtalk.md#openapi-errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

from aiohttp import web

T = TypeVar("T")

# API names: the keys of `calls`, `qps_rejections` and `fail_next`.
API_GATEWAY_OPEN = "gateway.open"
API_TOKEN = "oauth2.accessToken"
API_CREATE_AND_DELIVER = "card.createAndDeliver"
API_CARD_CREATE = "card.create"
API_CARD_DELIVER = "card.deliver"
API_CARD_UPDATE = "card.update"
API_CARD_STREAMING = "card.streaming"
API_FILE_DOWNLOAD = "robot.messageFiles.download"
API_BATCH_SEND = "robot.oToMessages.batchSend"
API_GROUP_SEND = "robot.groupMessages.send"
API_MEDIA_UPLOAD = "media.upload"
API_WEBHOOK = "webhook"
KNOWN_APIS = frozenset(value for name, value in dict(globals()).items() if name.startswith("API_"))


def now_ms() -> int:
    return int(time.time() * 1000)


def request_id() -> str:
    return str(uuid.uuid4()).upper()


def api_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message, "requestid": request_id()}, status=status)


def is_str_map(value: Any) -> TypeGuard[dict[str, str]]:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


async def read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        return None


@dataclass
class FakeApp:
    client_id: str
    client_secret: str
    robot_code: str
    app_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    denied_scopes: set[str] = field(default_factory=set)  # permissions the app was not granted


@dataclass
class _Fault:
    status: int
    body: Any
    delay: float


class DingTalkCore:
    """The state and plumbing the endpoint families build on. Bind: 127.0.0.1 only; `port=0` picks a free port."""

    def __init__(self, *, port: int = 0):
        self.host = "127.0.0.1"
        self.port = port
        self.apps: dict[str, FakeApp] = {}
        self.calls: Counter[str] = Counter()
        self._faults: dict[str, deque[_Fault]] = {}
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def register_app(self, client_id: str, client_secret: str, *, robot_code: str | None = None) -> FakeApp:
        app = FakeApp(client_id=client_id, client_secret=client_secret, robot_code=robot_code or client_id)
        self.apps[client_id] = app
        return app

    def fail_next(
        self,
        api: str,
        count: int = 1,
        *,
        status: int = 500,
        code: str = "system.busy",
        message: str = "injected failure",
        body: Any = None,
        delay: float = 0.0,
    ) -> None:
        """Make the next `count` calls of `api` answer `status` with an error body (or `body` as given),
        after `delay` seconds. For the gateway, `body={}` or `{"foo": 1}` with status 200 are the odd shapes
        of docs/dingtalk.md#opening-a-connection."""
        if api not in KNOWN_APIS:
            raise ValueError(f"unknown API {api!r}; one of {sorted(KNOWN_APIS)}")
        payload = body if body is not None else {"code": code, "message": message, "requestid": request_id()}
        queue = self._faults.setdefault(api, deque())
        for _ in range(count):
            queue.append(_Fault(status, payload, delay))

    async def wait_for(
        self, predicate: Callable[[], T | None], timeout: float = 5.0, what: str = "a condition"
    ) -> T:
        """Wait until `predicate()` is truthy (checked after every change the fake sees); return its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"fake DingTalk: timed out waiting for {what}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                # Changes on the client's side are not seen here: look again now and then.
                await asyncio.wait_for(changed.wait(), min(remaining, 0.02))

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _app(self, client_id: str | None) -> FakeApp:
        if client_id is None:
            if len(self.apps) != 1:
                raise ValueError("client_id is needed when the fake knows several apps (or none)")
            return next(iter(self.apps.values()))
        return self.apps[client_id]

    def _take_fault(self, api: str) -> _Fault | None:
        queue = self._faults.get(api)
        return queue.popleft() if queue else None

    async def _fault_response(self, fault: _Fault) -> web.Response:
        if fault.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.delay)
        return web.json_response(fault.body, status=fault.status)
