"""What every route of the fake Dify shares: the apps and the run registries, authentication, request
recording, the error middleware, the database pool model, and the bus that the run events route listens on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.dialect import Dialect, ValidationFailure, check_version
from dingdifyd.simulator.dify.errors import INTERNAL_SERVER_ERROR, DifyHTTPError
from dingdifyd.simulator.dify.forms import FakeForm
from dingdifyd.simulator.dify.model import (
    DIFY_VERSION,
    ID_NAMESPACE,
    Behaviour,
    Conversation,
    FakeApp,
    RecordedRequest,
    Run,
    WorkflowRun,
)
from dingdifyd.simulator.dify.sse import Subscription

DIALECT_KEY = web.RequestKey("dialect", Dialect)  # the version the answer to a request speaks (its app's)
PAYLOAD_MODEL_KEY = web.RequestKey("payload_model", str)  # 1.x: the pydantic model a validation error names


class DifyCore:
    """The state and plumbing the endpoint families build on (see `FakeDify` for the options)."""

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
        self.version = check_version(version)  # of apps added without one, and of answers to unknown keys
        self.ping_interval = ping_interval
        # a 0.15.3 fake with one 1.x trait each (1.16.1 apps have both anyway)
        self.info_with_mode = info_with_mode  # late 1.x /info carries the app mode; 0.15.3 does not
        self.conversation_error_suffix = conversation_error_suffix  # 1.x appends route hints to the 404
        self.apps: dict[str, FakeApp] = {}
        self.forms: dict[str, FakeForm] = {}  # form token (or form id, without a token) -> form
        self.requests: list[RecordedRequest] = []
        self.conversations: dict[str, Conversation] = {}
        self.workflow_runs: dict[str, WorkflowRun] = {}
        self.db_pool = db_pool
        self.db_pool_timeout = db_pool_timeout
        self.db_generator_delay = db_generator_delay
        self._db: asyncio.Semaphore | None = None
        self.db_in_use = 0
        self.max_db_in_use = 0
        self.db_pool_timeouts = 0  # requests that failed with 500 for want of a database connection
        self._next: dict[str, deque[dict[str, Any]]] = {}
        self._running: dict[str, Run] = {}
        self._paused: dict[str, Run] = {}  # workflow run id -> its run, until a form answer resumes it
        self._runs_by_id: dict[str, Run] = {}  # workflow run id -> its run, while it runs or waits
        self._joined: dict[str, asyncio.Event] = {}  # workflow run id -> set once its events route has a client
        self._subscribers: dict[str, list[Subscription]] = {}  # workflow run id -> its events route clients
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self.base_url = ""

    @property
    def public_url(self) -> str:
        """The host without /v1: relative file URLs (`/files/tools/...`) are relative to it."""
        return self.base_url.removesuffix("/v1")

    def requests_to(self, path_suffix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    @property
    def running_task_ids(self) -> list[str]:
        return list(self._running)

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except DifyHTTPError as exc:
            return self._dialect_of(request).restx_body(exc.payload, exc.status)
        except ValidationFailure as exc:
            dialect = self._dialect_of(request)
            return dialect.restx_body(dialect.validation_payload(exc, request.get(PAYLOAD_MODEL_KEY, "")), 400)
        except web.HTTPNotFound:
            message = (
                "The requested URL was not found on the server. If you entered the URL manually please check "
                "your spelling and try again."
            )
            return self._dialect_of(request).restx_body({"code": "not_found", "message": message, "status": 404}, 404)
        except web.HTTPMethodNotAllowed:
            message = "The method is not allowed for the requested URL."
            body = {"code": "method_not_allowed", "message": message, "status": 405}
            return self._dialect_of(request).restx_body(body, 405)

    @web.middleware
    async def _db_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Each API request holds a database connection while it runs (see `db_pool`)."""
        if self.db_pool is None or not request.path.startswith("/v1/") or request.path == "/v1/":
            return await handler(request)
        await self._db_connect()
        try:
            return await handler(request)
        finally:
            self._db_release()

    async def _db_connect(self) -> None:
        if self._db is None:
            self._db = asyncio.Semaphore(self.db_pool or 1)
        try:
            await asyncio.wait_for(self._db.acquire(), self.db_pool_timeout)
        except TimeoutError:
            self.db_pool_timeouts += 1
            raise DifyHTTPError(500, "internal_server_error", INTERNAL_SERVER_ERROR) from None
        self.db_in_use += 1
        self.max_db_in_use = max(self.max_db_in_use, self.db_in_use)

    def _db_release(self) -> None:
        assert self._db is not None
        self.db_in_use -= 1
        self._db.release()

    def _dialect_of(self, request: web.Request) -> Dialect:
        dialect = request.get(DIALECT_KEY)
        return dialect if isinstance(dialect, Dialect) else Dialect(self.version)

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        self._dialect_of(request).add_headers(response)

    def _record(self, request: web.Request, app: FakeApp | None, body: Any) -> None:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                app=app.name if app else None,
                json=body,
                headers=headers,
                query=dict(request.query),
            )
        )

    def _app_of(self, request: web.Request) -> FakeApp | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        app = self.apps.get(token.strip()) if scheme.lower() == "bearer" else None
        if app is not None:
            request[DIALECT_KEY] = app.dialect  # the answer, errors included, is in the app's version
        return app

    def _authenticate(self, request: web.Request) -> FakeApp:
        header = request.headers.get("Authorization")
        if header is None or " " not in header:
            raise DifyHTTPError(401, "unauthorized", "Authorization header must be provided and start with 'Bearer'")
        scheme, token = header.split(None, 1)
        if scheme.lower() != "bearer":
            raise DifyHTTPError(401, "unauthorized", "Authorization scheme must be 'Bearer'")
        app = self.apps.get(token.strip())
        if app is None:
            raise DifyHTTPError(401, "unauthorized", "Access token is invalid")
        request[DIALECT_KEY] = app.dialect
        return app

    async def _read_json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    @staticmethod
    def _require_user(body: Any) -> str:
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            raise DifyHTTPError(400, "invalid_param", "Arg user must be provided.")
        return user

    def _end_user_id(self, app: FakeApp, user: str) -> str:
        return str(uuid.uuid5(ID_NAMESPACE, f"{app.id}:{user}"))

    async def _pause(self, run: Run, seconds: float) -> bool:
        """Sleep between tokens; True when the run was stopped meanwhile (the stream then ends early)."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await run.stop.wait()
        return run.stop.is_set()

    async def _linger(self, request: web.Request, seconds: float | None) -> None:
        """Keep the socket open, silent, until the client goes, the server closes, or `seconds` pass."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self._closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self._closing.wait()

    def _behaviour_for(self, app: FakeApp) -> Behaviour:
        queue = self._next.get(app.api_key)
        if queue:
            return dataclasses.replace(app.behaviour, **queue[0])
        return app.behaviour

    def _consume_next_request(self, app: FakeApp) -> None:
        queue = self._next.get(app.api_key)
        if queue:
            queue.popleft()

    def _finish_conversation(self, run: Run) -> None:
        if run.conversation is not None:
            run.conversation.answers.append(run.sent)

    def _publish(self, run_id: str, obj: dict[str, Any]) -> None:
        for subscription in self._subscribers.get(run_id, ()):
            subscription.queue.put_nowait(obj)

    async def _wait_subscriber(self, run_id: str, seconds: float) -> None:
        joined = self._joined.setdefault(run_id, asyncio.Event())
        if not self._subscribers.get(run_id):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await joined.wait()
