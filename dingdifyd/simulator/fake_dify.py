"""A fake Dify 0.15.3 Service API on loopback, shaped like the recorded transcripts.

Its answers are byte-shaped like those of a real Dify 0.15.3 whose LLM is the capture's fake model:
`json.dumps` with default separators and ASCII escaping, the same keys in the same order, one
`data: <json>\\n\\n` chunk per event, `event: ping\\n\\n` keep-alives, flask-restful error bodies with their
trailing newline. The fake model answers `Echo: <query> | This is a fake streamed answer from the local fake
OpenAI server.` word by word; a query with `slow` in it gets forty slow words, one with `fail500` fails
upstream (an `error` event, or a failed workflow run).

`FakeDify` is both the server and the controller that tests use: it registers apps by API key, changes how
they answer (pacing, scripted text, failures, stalls, cuts, moderation, tool files, concurrency limit), for
an app or for its next request only, and records every request, stop, upload, conversation and workflow run.
It can also model a stock Dify's bounded database pool (`db_pool`), whose exhaustion makes requests hang and
then fail with a 500, as bursts do to a real one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import json
import logging
import mimetypes
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import BodyPartReader, web

log = logging.getLogger(__name__)

DIFY_VERSION = "0.15.3"
MODES = ("chat", "agent-chat", "advanced-chat", "workflow", "completion")
CHAT_MODES = ("chat", "agent-chat", "advanced-chat")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

ANSWER_TAIL = "This is a fake streamed answer from the local fake OpenAI server."
UPSTREAM_FAILURE = (
    "[openai_api_compatible] Error: API request failed with status code 500: "
    '{"error": {"message": "fake upstream failure", "type": "server_error"}}'
)
INTERNAL_SERVER_ERROR = (
    "The server encountered an internal error and was unable to complete your request. "
    "Either the server is overloaded or there is an error in the application."
)
# a 1x1 transparent PNG: what a tool "generated" (served under /files/tools/...)
TOOL_IMAGE = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
_ID_NAMESPACE = uuid.UUID("5f0c8a34-8d2e-4b8e-9a56-0d9f3c1b7e21")
_CHAT_FORM = [
    {
        "text-input": {
            "label": "Topic",
            "variable": "topic",
            "required": False,
            "max_length": 64,
            "default": "",
        }
    }
]
_TEXT_FORM = [
    {
        "text-input": {
            "label": "Query",
            "variable": "query",
            "required": True,
            "max_length": 256,
            "default": "",
        }
    }
]


@dataclass(frozen=True)
class Behaviour:
    """How an app answers. "Tokens" are streamed text events (`message`, `agent_message`, `text_chunk`).

    The stream faults (error, stall, cut, end) and pacing apply to streaming requests; blocking ones answer at
    once (a `fail500` query still fails them, with the 400 Dify gives when the LLM fails before the answer).
    """

    token_delay: float = 0.02  # seconds between two text events
    slow_token_delay: float = 0.5  # the same, for queries containing "slow"
    answer: str | None = None  # scripted answer text instead of the echo
    mention_turn: bool = False  # echo answers say which turn of the conversation they are
    workflow_streams_text: bool = True  # False: a workflow app streams no text_chunk, only the final outputs
    http_500: bool = False  # 500 internal_server_error before any stream
    error_after: int | None = None  # upstream LLM failure after N tokens (error event; failed run for workflows)
    stall_after: int | None = None  # total silence after N tokens (no pings either), socket left open
    cut_after: int | None = None  # connection closed after N tokens, mid-body, without a terminal event
    end_after: int | None = None  # body ended cleanly after N tokens, without a terminal event (a polite proxy)
    replace_with: str | None = None  # moderation: message_replace (text_replace for workflows) before the end
    message_file: bool = False  # a tool-made image: message_file with a relative, signed URL
    agent_tool: str | None = None  # agent apps: call this tool before answering
    max_active_streams: int | None = None  # 429 too_many_requests when this many streams are already running
    hold_open_after_end: float = 0.0  # keep the socket open this long after the terminal event (title generation)
    first_token_delay: float = 0.0  # the model's latency: silence before the first text event (after tools, nodes)


@dataclass
class FakeApp:
    api_key: str
    mode: str
    name: str
    description: str = ""
    user_input_form: list[dict[str, Any]] = field(default_factory=list)
    opening_statement: str = ""
    file_upload: bool = True
    behaviour: Behaviour = field(default_factory=Behaviour)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    workflow_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    runs_started: int = 0  # workflow `sequence_number`


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    app: str | None  # name of the app the key belongs to; None when the key was missing or unknown
    json: Any  # the decoded JSON body; None for GET, form uploads and undecodable bodies
    headers: dict[str, str]  # without Authorization
    query: dict[str, str]


@dataclass
class Conversation:
    id: str
    app: str
    user: str
    queries: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    created_at: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class StopRecord:
    path: str
    task_id: str
    user: str
    found: bool  # a running task of this app and user had that id


@dataclass(frozen=True)
class UploadedFile:
    id: str
    name: str
    size: int
    extension: str
    mime_type: str
    user: str
    data: bytes


@dataclass
class WorkflowRun:
    id: str
    app: str
    workflow_id: str
    inputs: dict[str, Any]
    status: str = "running"
    outputs: dict[str, Any] | None = None
    error: str | None = None
    total_steps: int = 0
    total_tokens: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    finished_at: int | None = None
    elapsed_time: float = 0.0


class DifyHTTPError(Exception):
    """An error answer, in Dify's JSON shape (the middleware renders it)."""

    def __init__(self, status: int, code: str, message: str, *, params: str | None = None):
        super().__init__(message)
        self.status = status
        # flask-restful's reqparse errors name the field and carry no status
        self.payload: dict[str, Any] = {"code": code, "message": message}
        if params is not None:
            self.payload["params"] = params
        else:
            self.payload["status"] = status


def _invalid(message: str, params: str | None = None) -> DifyHTTPError:
    return DifyHTTPError(400, "invalid_param", message, params=params)


def split_tokens(text: str) -> list[str]:
    """The fake model's tokens: the first word, then " word" each, then an empty closing delta."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:]), ""]


def _json_body(obj: Any, status: int = 200, *, newline: bool = True) -> web.Response:
    """flask-restful answers end with a newline; Dify's own blocking answers do not."""
    text = json.dumps(obj) + ("\n" if newline else "")
    return web.Response(status=status, body=text.encode(), content_type="application/json")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@dataclass
class _Run:
    """One generation request being answered."""

    app: FakeApp
    user: str
    query: str
    inputs: dict[str, Any]
    behaviour: Behaviour
    answer: str
    token_delay: float
    fails_upstream: bool
    conversation: Conversation | None
    files: list[dict[str, Any]]
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    workflow_run: WorkflowRun | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: str = ""  # the text streamed so far
    tokens_sent: int = 0

    @property
    def conversation_id(self) -> str:
        return self.conversation.id if self.conversation else ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def usage(self) -> dict[str, Any]:
        completion_tokens = max(self.tokens_sent - 1, 0)
        return {
            "prompt_tokens": 10,
            "prompt_unit_price": "0",
            "prompt_price_unit": "0",
            "prompt_price": "0E-7",
            "completion_tokens": completion_tokens,
            "completion_unit_price": "0",
            "completion_price_unit": "0",
            "completion_price": "0E-7",
            "total_tokens": 10 + completion_tokens,
            "total_price": "0E-7",
            "currency": "USD",
            "latency": self.elapsed(),
        }


class _EventWriter:
    """Writes SSE chunks; a lock keeps the ping task and the answer from interleaving inside a chunk."""

    def __init__(self, response: web.StreamResponse):
        self._response = response
        self._lock = asyncio.Lock()
        self._ping_task: asyncio.Task[None] | None = None

    async def send(self, obj: dict[str, Any]) -> None:
        await self._write(f"data: {json.dumps(obj)}\n\n".encode())

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            await self._response.write(data)

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
            while True:
                await asyncio.sleep(interval)
                await self._write(b"event: ping\n\n")


class _Outcome:
    DONE = "done"
    STOPPED = "stopped"
    ERROR = "error"
    STALL = "stall"
    CUT = "cut"
    END = "end"


class FakeDify:
    """The fake server and its test controls. `await start()` binds 127.0.0.1; `base_url` ends in /v1."""

    def __init__(
        self,
        *,
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
        self.ping_interval = ping_interval
        self.info_with_mode = info_with_mode  # late 1.x /info carries the app mode; 0.15.3 does not
        self.conversation_error_suffix = conversation_error_suffix  # 1.x appends route hints to the 404
        self.apps: dict[str, FakeApp] = {}
        self.requests: list[RecordedRequest] = []
        self.stops: list[StopRecord] = []
        self.uploads: dict[str, UploadedFile] = {}
        self.conversations: dict[str, Conversation] = {}
        self.workflow_runs: dict[str, WorkflowRun] = {}
        self.tool_files: dict[str, bytes] = {}
        self.output_files: dict[str, dict[str, Any]] = {}  # api key -> file outputs of its workflow runs
        self.first_text_at: dict[str, float] = {}  # user -> when the first answer text of theirs was written
        self.file_delay = 0.0  # seconds each file download (/files/...) takes before its bytes
        self.db_pool = db_pool
        self.db_pool_timeout = db_pool_timeout
        self.db_generator_delay = db_generator_delay
        self._db: asyncio.Semaphore | None = None
        self.db_in_use = 0
        self.max_db_in_use = 0
        self.db_pool_timeouts = 0  # requests that failed with 500 for want of a database connection
        self.generations_in_flight = 0
        self.max_generations_in_flight = 0  # the most answers streaming at the same time
        self.files_served = 0
        self.max_files_in_flight = 0  # the most file downloads served at the same time
        self._files_in_flight = 0
        self._next: dict[str, deque[dict[str, Any]]] = {}
        self._running: dict[str, _Run] = {}
        self._suggested: dict[str, tuple[list[str], float]] = {}  # api key -> (questions, delay)
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

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
        **behaviour: Any,
    ) -> FakeApp:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if user_input_form is None:
            user_input_form = _TEXT_FORM if mode in ("workflow", "completion") else _CHAT_FORM
        app = FakeApp(
            api_key=api_key,
            mode=mode,
            name=name or f"fake-{mode}",
            description=description or f"local fake {mode} app",
            user_input_form=json.loads(json.dumps(user_input_form)),
            opening_statement=opening_statement,
            file_upload=file_upload,
            behaviour=Behaviour(**behaviour),
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

    def requests_to(self, path_suffix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    @property
    def running_task_ids(self) -> list[str]:
        return list(self._running)

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

    @property
    def public_url(self) -> str:
        """The host without /v1: relative file URLs (`/files/tools/...`) are relative to it."""
        return self.base_url.removesuffix("/v1")

    async def close(self) -> None:
        self._closing.set()  # ends stalls and held-open sockets at once
        for run in self._running.values():
            run.stop.set()  # wakes streams between two tokens; they see the server closing and hang up
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
            web.get("/v1/", self._root),
            web.get("/v1", self._root),
            web.get("/v1/info", self._info),
            web.get("/v1/parameters", self._parameters),
            web.get("/v1/meta", self._meta),
            web.post("/v1/chat-messages", self._chat_messages),
            web.post("/v1/completion-messages", self._completion_messages),
            web.post("/v1/workflows/run", self._workflows_run),
            web.get("/v1/workflows/run/{run_id}", self._workflow_run_detail),
            web.post("/v1/chat-messages/{task_id}/stop", self._stop_chat),
            web.post("/v1/completion-messages/{task_id}/stop", self._stop_completion),
            web.post("/v1/workflows/tasks/{task_id}/stop", self._stop_workflow),
            web.post("/v1/files/upload", self._upload),
            web.get("/files/tools/{name}", self._tool_file),
            web.get("/files/{file_id}/file-preview", self._file_preview),
            web.get("/v1/messages/{message_id}/suggested", self._suggested_questions),
        ]
        app.add_routes(routes)
        return app

    # --- plumbing -----------------------------------------------------------------------------------------

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except DifyHTTPError as exc:
            return _json_body(exc.payload, exc.status)
        except web.HTTPNotFound:
            message = (
                "The requested URL was not found on the server. If you entered the URL manually please check "
                "your spelling and try again."
            )
            return _json_body({"code": "not_found", "message": message, "status": 404}, 404)
        except web.HTTPMethodNotAllowed:
            message = "The method is not allowed for the requested URL."
            return _json_body({"code": "method_not_allowed", "message": message, "status": 405}, 405)

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

    @staticmethod
    async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["X-Version"] = DIFY_VERSION
        response.headers["X-Env"] = "PRODUCTION"

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
        return self.apps.get(token.strip()) if scheme.lower() == "bearer" else None

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
        return str(uuid.uuid5(_ID_NAMESPACE, f"{app.id}:{user}"))

    async def _pause(self, run: _Run, seconds: float) -> bool:
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

    # --- simple endpoints ---------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        self._record(request, None, None)
        return _json_body({"welcome": "Dify OpenAPI", "api_version": "v1", "server_version": DIFY_VERSION})

    async def _info(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        self._record(request, app, None)
        app = self._authenticate(request)
        info: dict[str, Any] = {"name": app.name, "description": app.description, "tags": []}
        if self.info_with_mode:
            info["mode"] = app.mode
            info["author_name"] = "fake"
        return _json_body(info)

    async def _meta(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        self._authenticate(request)
        return _json_body({"tool_icons": {}})

    async def _parameters(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        methods = ["local_file", "remote_url"]
        return _json_body(
            {
                "opening_statement": app.opening_statement,
                "suggested_questions": [],
                "suggested_questions_after_answer": {"enabled": app.api_key in self._suggested},
                "speech_to_text": {"enabled": False},
                "text_to_speech": {"enabled": False, "voice": "", "language": ""},
                "retriever_resource": {"enabled": False},
                "annotation_reply": {"enabled": False},
                "more_like_this": {"enabled": False},
                "user_input_form": app.user_input_form,
                "sensitive_word_avoidance": {"enabled": False, "type": "", "configs": []},
                "file_upload": {
                    "enabled": app.file_upload,
                    "allowed_file_types": ["image", "document"],
                    "allowed_file_extensions": [],
                    "allowed_file_upload_methods": methods,
                    "number_limits": 3,
                    "image": {
                        "enabled": app.file_upload,
                        "number_limits": 3,
                        "detail": "high",
                        "transfer_methods": methods,
                    },
                },
                "system_parameters": {
                    "image_file_size_limit": 10,
                    "video_file_size_limit": 100,
                    "audio_file_size_limit": 50,
                    "file_size_limit": 15,
                    "workflow_file_upload_limit": 10,
                },
            }
        )

    async def _upload(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        fields: dict[str, str] = {}
        files: list[tuple[str, str, bytes]] = []
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):  # nested multipart: not something Dify takes
                    continue
                if part.filename is not None:
                    content_type = part.headers.get("Content-Type", "application/octet-stream")
                    files.append((part.filename, content_type, bytes(await part.read())))
                elif part.name:
                    fields[part.name] = await part.text()
        self._record(request, app, {**fields, "files": [name for name, _, _ in files]})
        app = self._authenticate(request)
        if not files:
            message = "The browser (or proxy) sent a request that this server could not understand."
            raise DifyHTTPError(400, "bad_request_key_error", message)
        if len(files) > 1:
            raise DifyHTTPError(400, "too_many_files", "Only one file is allowed.")
        name, mime_type, data = files[0]
        if len(data) > 15 * 1024 * 1024:
            raise DifyHTTPError(413, "file_too_large", "File size exceeded. 15 MB is the limit.")
        user = fields.get("user") or "DEFAULT-USER"
        uploaded = UploadedFile(
            id=str(uuid.uuid4()),
            name=name,
            size=len(data),
            extension=name.rpartition(".")[2].lower() if "." in name else "",
            mime_type=mime_type,
            user=user,
            data=data,
        )
        self.uploads[uploaded.id] = uploaded
        body = {
            "id": uploaded.id,
            "name": uploaded.name,
            "size": uploaded.size,
            "extension": uploaded.extension,
            "mime_type": uploaded.mime_type,
            "created_by": self._end_user_id(app, user),
            "created_at": int(time.time()),
        }
        return _json_body(body, 201)

    async def _tool_file(self, request: web.Request) -> web.Response:
        data = self.tool_files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        if not request.query.get("sign"):
            raise DifyHTTPError(403, "forbidden", "Invalid request.")
        content_type = mimetypes.guess_type(request.match_info["name"])[0] or "application/octet-stream"
        self._files_in_flight += 1
        self.max_files_in_flight = max(self.max_files_in_flight, self._files_in_flight)
        try:
            if self.file_delay:
                await asyncio.sleep(self.file_delay)
            self.files_served += 1
            return web.Response(body=data, content_type=content_type)
        finally:
            self._files_in_flight -= 1

    async def _file_preview(self, request: web.Request) -> web.Response:
        uploaded = self.uploads.get(request.match_info["file_id"])
        if uploaded is None:
            raise web.HTTPNotFound()
        return web.Response(body=uploaded.data, content_type=uploaded.mime_type)

    async def _workflow_run_detail(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        if app.mode != "workflow":
            raise DifyHTTPError(
                400, "not_workflow_app", "Please check if your Workflow app mode matches the right API route."
            )
        run = self.workflow_runs.get(request.match_info["run_id"])
        if run is None or run.app != app.name:
            raise DifyHTTPError(404, "not_found", "Workflow run not found.")
        return _json_body(
            {
                "id": run.id,
                "workflow_id": run.workflow_id,
                "status": run.status,
                "inputs": json.dumps(run.inputs),
                "outputs": json.dumps(run.outputs) if run.outputs is not None else None,
                "error": run.error,
                "total_steps": run.total_steps,
                "total_tokens": run.total_tokens,
                "created_at": email.utils.formatdate(run.created_at),
                "finished_at": email.utils.formatdate(run.finished_at) if run.finished_at else None,
                "elapsed_time": run.elapsed_time,
            }
        )

    # --- stop ---------------------------------------------------------------------------------------------

    async def _stop_chat(self, request: web.Request) -> web.Response:
        return await self._stop(request, CHAT_MODES, DifyHTTPError(400, "not_chat_app", _ROUTE_MISMATCH))

    async def _stop_completion(self, request: web.Request) -> web.Response:
        return await self._stop(request, ("completion",), DifyHTTPError(400, "app_unavailable", _APP_UNAVAILABLE))

    async def _stop_workflow(self, request: web.Request) -> web.Response:
        return await self._stop(request, ("workflow",), DifyHTTPError(400, "not_workflow_app", _WORKFLOW_MISMATCH))

    async def _stop(self, request: web.Request, modes: tuple[str, ...], wrong_mode: DifyHTTPError) -> web.Response:
        body = await self._read_json(request)
        self._record(request, self._app_of(request), body)
        app = self._authenticate(request)
        user = self._require_user(body)
        if app.mode not in modes:
            raise wrong_mode
        task_id = request.match_info["task_id"]
        run = self._running.get(task_id)
        # Dify answers success whatever the id; only the owner's stop flag takes effect
        found = run is not None and run.app is app and run.user == user
        if run is not None and found:
            run.stop.set()
        self.stops.append(StopRecord(path=request.path, task_id=task_id, user=user, found=found))
        return _json_body({"result": "success"})

    # --- generation ---------------------------------------------------------------------------------------

    async def _chat_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completion_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _workflows_run(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "workflow")

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        body = await self._read_json(request)
        self._record(request, self._app_of(request), body)
        app = self._authenticate(request)
        if body is None:
            message = "The browser (or proxy) sent a request that this server could not understand."
            raise DifyHTTPError(400, "bad_request", message)
        user = self._require_user(body)
        self._check_route(app, endpoint)
        query, streaming, conversation_id = self._parse_args(app, endpoint, body)
        behaviour = self._behaviour_for(app)
        limit = behaviour.max_active_streams
        if limit is not None and sum(1 for r in self._running.values() if r.app is app) >= limit:
            message = (
                "Too many requests. Please try again later. The current maximum concurrent requests allowed "
                f"for {app.id} is {limit}."
            )
            raise DifyHTTPError(429, "too_many_requests", message)
        if app.mode == "agent-chat" and not streaming:
            raise DifyHTTPError(400, "invalid_param", "Agent Chat App does not support blocking mode")
        conversation = self._find_conversation(app, user, conversation_id) if app.mode in CHAT_MODES else None
        inputs = self._validate_inputs(app, body.get("inputs") or {})
        files = self._validate_files(body.get("files"))
        if app.mode in CHAT_MODES and not query:
            raise _invalid("query is required")
        self._consume_next_request(app)  # only a request that got this far uses up a one-shot override
        if behaviour.http_500:
            raise DifyHTTPError(500, "internal_server_error", INTERNAL_SERVER_ERROR)

        if app.mode in CHAT_MODES and conversation is None:
            conversation = Conversation(id=str(uuid.uuid4()), app=app.name, user=user)
            self.conversations[conversation.id] = conversation
        text_query = query if app.mode in CHAT_MODES else self._text_input(app, inputs) or query
        slow = "slow" in text_query.lower()
        run = _Run(
            app=app,
            user=user,
            query=text_query,
            inputs=inputs,
            behaviour=behaviour,
            answer=self._answer_for(behaviour, text_query, conversation, slow),
            token_delay=behaviour.slow_token_delay if slow else behaviour.token_delay,
            fails_upstream="fail500" in text_query,
            conversation=conversation,
            files=files,
        )
        if conversation is not None:
            conversation.queries.append(query)
        if app.mode == "workflow":
            app.runs_started += 1
            run.workflow_run = WorkflowRun(
                id=str(uuid.uuid4()), app=app.name, workflow_id=app.workflow_id, inputs=self._sys_inputs(run)
            )
            self.workflow_runs[run.workflow_run.id] = run.workflow_run
        elif app.mode == "advanced-chat":
            app.runs_started += 1
        if not streaming:
            return self._blocking(run)
        if self.db_pool is None:
            return await self._stream(request, run)
        await asyncio.sleep(self.db_generator_delay)  # the generator's setup, this request's connection held
        await self._db_connect()  # the app generator's own session, for the whole stream
        try:
            return await self._stream(request, run)
        finally:
            self._db_release()

    def _check_route(self, app: FakeApp, endpoint: str) -> None:
        if endpoint == "chat" and app.mode not in CHAT_MODES:
            raise DifyHTTPError(400, "not_chat_app", _ROUTE_MISMATCH)
        if endpoint == "completion" and app.mode != "completion":
            raise DifyHTTPError(400, "app_unavailable", _APP_UNAVAILABLE)
        if endpoint == "workflow" and app.mode != "workflow":
            raise DifyHTTPError(400, "not_workflow_app", _WORKFLOW_MISMATCH)

    def _parse_args(self, app: FakeApp, endpoint: str, body: dict[str, Any]) -> tuple[str, bool, str]:
        """flask-restful reqparse, in the order Dify declares the arguments: the first problem wins."""
        missing = "Missing required parameter in the JSON body"
        if not isinstance(body.get("inputs"), dict):
            raise _invalid(missing, "inputs")
        query = body.get("query")
        if endpoint == "chat" and query is None:
            raise _invalid(missing, "query")
        if query is not None and not isinstance(query, str):
            query = str(query)
        mode = body.get("response_mode")
        if mode is not None and mode not in ("blocking", "streaming"):
            raise _invalid(f"{mode} is not a valid choice", "response_mode")
        conversation_id = body.get("conversation_id") or ""
        if endpoint == "chat" and conversation_id and not _is_uuid(str(conversation_id)):
            raise _invalid(f"{conversation_id} is not a valid uuid.", "conversation_id")
        return query or "", mode == "streaming", str(conversation_id)

    def _behaviour_for(self, app: FakeApp) -> Behaviour:
        queue = self._next.get(app.api_key)
        if queue:
            return dataclasses.replace(app.behaviour, **queue[0])
        return app.behaviour

    def _consume_next_request(self, app: FakeApp) -> None:
        queue = self._next.get(app.api_key)
        if queue:
            queue.popleft()

    def _find_conversation(self, app: FakeApp, user: str, conversation_id: str) -> Conversation | None:
        if not conversation_id:
            return None
        conversation = self.conversations.get(conversation_id)
        if conversation is None or conversation.app != app.name or conversation.user != user:
            message = "Conversation Not Exists."
            if self.conversation_error_suffix:
                message += (
                    " You have requested this URI [/v1/chat-messages] but did you mean /v1/chat-messages or "
                    "/api/chat-messages or /v1/chat-messages/<string:task_id>/stop ?"
                )
            raise DifyHTTPError(404, "not_found", message)
        return conversation

    def _validate_inputs(self, app: FakeApp, inputs: dict[str, Any]) -> dict[str, Any]:
        """Like Dify's BaseAppGenerator: every form variable checked, unknown inputs dropped."""
        cleaned: dict[str, Any] = {}
        for item in app.user_input_form:
            for kind, spec in item.items():
                name = spec["variable"]
                value = inputs.get(name)
                if value in (None, ""):
                    if spec.get("required"):
                        raise _invalid(f"{name} is required in input form")
                    cleaned[name] = None if kind == "file" else spec.get("default") or None
                    continue
                if kind in ("text-input", "paragraph", "select") and not isinstance(value, str):
                    raise _invalid(f"{name} in input form must be a string")
                if kind == "select" and value not in spec.get("options", []):
                    raise _invalid(f"{name} in input form must be one of the following: {spec.get('options')}")
                max_length = spec.get("max_length")
                if isinstance(value, str) and max_length and len(value) > max_length:
                    raise _invalid(f"{name} in input form must be less than {max_length} characters")
                cleaned[name] = value
        return cleaned

    @staticmethod
    def _text_input(app: FakeApp, inputs: dict[str, Any]) -> str:
        """What the fake model answers for completion and workflow apps: the first text input given."""
        for item in app.user_input_form:
            for kind, spec in item.items():
                value = inputs.get(spec["variable"])
                if kind in ("text-input", "paragraph") and isinstance(value, str) and value:
                    return value
        return ""

    def _validate_files(self, files: Any) -> list[dict[str, Any]]:
        if not files:
            return []
        if not isinstance(files, list):
            raise _invalid("files must be a list")
        for item in files:
            if not isinstance(item, dict):
                raise _invalid("Invalid upload file")
            method = item.get("transfer_method")
            if method == "local_file" and item.get("upload_file_id") not in self.uploads:
                raise _invalid("Invalid upload file")
            if method == "remote_url" and not item.get("url"):
                raise _invalid("Missing file url")
            if method not in ("local_file", "remote_url"):
                raise _invalid("Invalid transfer method")
        return files

    @staticmethod
    def _answer_for(behaviour: Behaviour, query: str, conversation: Conversation | None, slow: bool) -> str:
        if behaviour.answer is not None:
            return behaviour.answer
        if slow:
            return "Slow answer: " + " ".join(f"word{i}" for i in range(40))
        if behaviour.mention_turn and conversation is not None:
            turn = len(conversation.queries) + 1
            return f"Echo: {query} | Turn {turn} of this conversation. {ANSWER_TAIL}"
        return f"Echo: {query} | {ANSWER_TAIL}"

    def _sys_inputs(self, run: _Run) -> dict[str, Any]:
        inputs = dict(run.inputs)
        if run.app.mode == "advanced-chat":
            inputs["sys.query"] = run.query
        inputs["sys.files"] = [self._file_variable(file) for file in run.files]
        if run.conversation is not None:
            inputs["sys.conversation_id"] = run.conversation.id
        inputs["sys.user_id"] = run.user
        if run.conversation is not None:
            inputs["sys.dialogue_count"] = len(run.conversation.answers)
        inputs["sys.app_id"] = run.app.id
        inputs["sys.workflow_id"] = run.app.workflow_id
        inputs["sys.workflow_run_id"] = self._workflow_run_id(run)
        return inputs

    def _file_variable(self, file: dict[str, Any]) -> dict[str, Any]:
        """How a workflow sees a file the request sent (`sys.files`)."""
        uploaded = self.uploads.get(file.get("upload_file_id") or "")
        if uploaded is not None:
            signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
            query = f"timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"
            name, size, mime_type = uploaded.name, uploaded.size, uploaded.mime_type
            url = f"{self.public_url}/files/{uploaded.id}/file-preview?{query}"
        else:
            url = str(file.get("url") or "")
            name, size, mime_type = url.rpartition("/")[2].partition("?")[0], -1, None
        return {
            "dify_model_identity": "__dify__file__",
            "id": None,
            "tenant_id": str(uuid.uuid5(_ID_NAMESPACE, "tenant")),
            "type": file.get("type", "image"),
            "transfer_method": file.get("transfer_method"),
            "remote_url": "" if uploaded is not None else url,
            "related_id": uploaded.id if uploaded is not None else None,
            "filename": name,
            "extension": "." + name.rpartition(".")[2] if "." in name else "",
            "mime_type": mime_type,
            "size": size,
            "url": url,
        }

    @staticmethod
    def _workflow_run_id(run: _Run) -> str:
        if run.workflow_run is not None:
            return run.workflow_run.id
        # chatflow runs are not kept; their id only needs to be stable within the stream
        return str(uuid.uuid5(_ID_NAMESPACE, run.task_id))

    # --- blocking -----------------------------------------------------------------------------------------

    def _blocking(self, run: _Run) -> web.Response:
        if run.fails_upstream:
            raise DifyHTTPError(400, "completion_request_error", UPSTREAM_FAILURE)
        run.sent = run.answer
        run.tokens_sent = len(split_tokens(run.answer))
        self._finish_conversation(run)
        if run.workflow_run is not None:
            self._finish_workflow_run(run, "succeeded", self._workflow_outputs(run), None)
            wf = run.workflow_run
            data = {
                "id": wf.id,
                "workflow_id": wf.workflow_id,
                "status": wf.status,
                "outputs": wf.outputs,
                "error": None,
                "elapsed_time": wf.elapsed_time,
                "total_tokens": wf.total_tokens,
                "total_steps": wf.total_steps,
                "created_at": wf.created_at,
                "finished_at": wf.finished_at,
            }
            return _json_body({"task_id": run.task_id, "workflow_run_id": wf.id, "data": data}, newline=False)
        answer: dict[str, Any] = {"event": "message", "task_id": run.task_id, "id": run.message_id}
        answer["message_id"] = run.message_id
        if run.conversation is not None:
            answer["conversation_id"] = run.conversation.id
        answer |= {"mode": run.app.mode, "answer": run.answer, "metadata": {"usage": run.usage()}}
        answer["created_at"] = run.created_at
        return _json_body(answer, newline=False)

    def _finish_conversation(self, run: _Run) -> None:
        if run.conversation is not None:
            run.conversation.answers.append(run.sent)

    def _finish_workflow_run(self, run: _Run, status: str, outputs: dict[str, Any] | None, error: str | None) -> None:
        wf = run.workflow_run
        if wf is None:
            return
        wf.status, wf.outputs, wf.error = status, outputs, error
        wf.total_steps = 3 if status == "succeeded" else 2
        wf.total_tokens = run.usage()["total_tokens"] if status == "succeeded" else 0
        wf.finished_at = int(time.time())
        wf.elapsed_time = run.elapsed()

    def _workflow_outputs(self, run: _Run) -> dict[str, Any]:
        return {"answer": run.sent, "echo_query": run.query, **self.output_files.get(run.app.api_key, {})}

    # --- streaming ----------------------------------------------------------------------------------------

    async def _stream(self, request: web.Request, run: _Run) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        writer = _EventWriter(response)
        writer.start_pings(self.ping_interval)
        self._running[run.task_id] = run
        self.generations_in_flight += 1
        self.max_generations_in_flight = max(self.max_generations_in_flight, self.generations_in_flight)
        emitters = {
            "chat": self._emit_chat,
            "agent-chat": self._emit_agent,
            "advanced-chat": self._emit_chatflow,
            "workflow": self._emit_workflow,
            "completion": self._emit_chat,
        }
        try:
            outcome = await emitters[run.app.mode](run, writer)
            await writer.stop_pings()
            if outcome == _Outcome.STALL:
                await self._linger(request, None)
            elif outcome == _Outcome.CUT:
                if request.transport is not None:
                    request.transport.close()
                return response
            elif outcome in (_Outcome.DONE, _Outcome.STOPPED) and run.behaviour.hold_open_after_end > 0:
                await self._linger(request, run.behaviour.hold_open_after_end)
            if outcome in (_Outcome.DONE, _Outcome.STOPPED):
                self._finish_conversation(run)
        except ConnectionError:
            log.debug("fake Dify: client went away during task %s", run.task_id)
        finally:
            await writer.stop_pings()
            self._running.pop(run.task_id, None)
            self.generations_in_flight -= 1
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    def _fault(self, run: _Run, index: int) -> str | None:
        b = run.behaviour
        if run.fails_upstream and index == 0:
            return _Outcome.ERROR
        for outcome, after in (
            (_Outcome.ERROR, b.error_after),
            (_Outcome.STALL, b.stall_after),
            (_Outcome.CUT, b.cut_after),
            (_Outcome.END, b.end_after),
        ):
            if after is not None and after == index:
                return outcome
        return None

    async def _stream_tokens(self, run: _Run, writer: _EventWriter, make_event: Callable[[str], dict[str, Any]]) -> str:
        tokens = split_tokens(run.answer)
        for index, token in enumerate(tokens):
            fault = self._fault(run, index)
            if fault is not None:
                return fault
            if self._closing.is_set():
                return _Outcome.CUT
            if run.stop.is_set():
                return _Outcome.STOPPED
            latency = run.behaviour.first_token_delay if index == 0 else 0.0
            if latency and await self._pause(run, latency):
                return _Outcome.CUT if self._closing.is_set() else _Outcome.STOPPED
            await writer.send(make_event(token))
            if index == 0:
                self.first_text_at.setdefault(run.user, time.monotonic())  # for the latency benchmark
            run.sent += token
            run.tokens_sent += 1
            if index < len(tokens) - 1 and await self._pause(run, run.token_delay):
                return _Outcome.CUT if self._closing.is_set() else _Outcome.STOPPED
        return self._fault(run, len(tokens)) or _Outcome.DONE

    # chunk shapes: chat apps start every chunk with event, conversation_id, message_id, created_at;
    # completion apps with event, message_id, created_at; workflow apps with event, workflow_run_id

    def _chunk(self, run: _Run, event: str, **body: Any) -> dict[str, Any]:
        if run.app.mode == "workflow":
            return {"event": event, "workflow_run_id": self._workflow_run_id(run), **body}
        chunk: dict[str, Any] = {"event": event}
        if run.app.mode != "completion":
            chunk["conversation_id"] = run.conversation_id
        chunk |= {"message_id": run.message_id, "created_at": run.created_at}
        return chunk | body

    def _message(self, run: _Run, token: str) -> dict[str, Any]:
        selector = ["llm", "text"] if run.app.mode == "advanced-chat" else None
        return self._chunk(
            run,
            "message",
            task_id=run.task_id,
            id=run.message_id,
            answer=token,
            from_variable_selector=selector,
        )

    def _message_end(self, run: _Run, *, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        files: list[Any] | None = [] if run.app.mode == "advanced-chat" else None
        metadata = {"usage": usage or run.usage()}
        return self._chunk(run, "message_end", task_id=run.task_id, id=run.message_id, metadata=metadata, files=files)

    def _upstream_error(self, run: _Run, *, code: str = "completion_request_error", prefix: str = "") -> dict[str, Any]:
        return self._chunk(run, "error", code=code, status=400, message=prefix + UPSTREAM_FAILURE)

    def _message_file(self, run: _Run) -> dict[str, Any]:
        name = f"{uuid.uuid4()}.png"
        self.tool_files[name] = TOOL_IMAGE
        signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        url = f"/files/tools/{name}?timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"
        return self._chunk(
            run,
            "message_file",
            task_id=run.task_id,
            id=str(uuid.uuid4()),
            type="image",
            belongs_to="assistant",
            url=url,
        )

    async def _moderate(self, run: _Run, writer: _EventWriter) -> None:
        replacement = run.behaviour.replace_with
        if replacement is None:
            return
        run.sent = replacement
        if run.app.mode == "workflow":
            await writer.send(self._chunk(run, "text_replace", task_id=run.task_id, data={"text": replacement}))
        else:
            await writer.send(self._chunk(run, "message_replace", task_id=run.task_id, answer=replacement))

    async def _emit_chat(self, run: _Run, writer: _EventWriter) -> str:
        """chat and completion apps: message×N, message_end."""
        outcome = await self._stream_tokens(run, writer, lambda token: self._message(run, token))
        if outcome == _Outcome.ERROR:
            await writer.send(self._upstream_error(run))
        if outcome not in (_Outcome.DONE, _Outcome.STOPPED):
            return outcome
        if run.behaviour.message_file:
            await writer.send(self._message_file(run))
        await self._moderate(run, writer)
        await writer.send(self._message_end(run))
        return outcome

    def _thought(self, run: _Run, thought_id: str, position: int, **fields: Any) -> dict[str, Any]:
        tool = fields.get("tool", "")
        labels = {tool: {"zh_Hans": tool, "en_US": tool}} if tool else {}
        return self._chunk(
            run,
            "agent_thought",
            task_id=run.task_id,
            id=thought_id,
            position=position,
            thought=fields.get("thought", ""),
            observation=fields.get("observation", ""),
            tool=tool,
            tool_labels=labels,
            tool_input=fields.get("tool_input", ""),
            message_files=fields.get("message_files", []),
        )

    async def _emit_agent(self, run: _Run, writer: _EventWriter) -> str:
        """agent_thought, [tool call: thoughts, message_file], agent_message×N, agent_thought, message_end."""
        position = 1
        thought_id = str(uuid.uuid4())
        await writer.send(self._thought(run, thought_id, position))
        tool = run.behaviour.agent_tool
        if tool:
            tool_input = json.dumps({tool: {}})
            await writer.send(self._thought(run, thought_id, position, tool=tool, tool_input=tool_input))
            result = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            observation = json.dumps({tool: result})
            if run.behaviour.answer is None:  # the capture's fake model reports what the tool said
                run.answer = f"Tool said: {result}"
            await writer.send(
                self._thought(run, thought_id, position, tool=tool, tool_input=tool_input, observation=observation)
            )
        if run.behaviour.message_file:
            await writer.send(self._message_file(run))
        if tool:
            position, thought_id = 2, str(uuid.uuid4())
            await writer.send(self._thought(run, thought_id, position))

        def agent_message(token: str) -> dict[str, Any]:
            return self._chunk(run, "agent_message", task_id=run.task_id, id=run.message_id, answer=token)

        outcome = await self._stream_tokens(run, writer, agent_message)
        if outcome == _Outcome.ERROR:
            await writer.send(self._upstream_error(run))
        if outcome not in (_Outcome.DONE, _Outcome.STOPPED):
            return outcome
        await writer.send(self._thought(run, thought_id, position, thought=run.sent))
        await self._moderate(run, writer)
        await writer.send(self._message_end(run))
        return outcome

    # workflow events ------------------------------------------------------------------------------------

    def _node(self, run: _Run, node_id: str) -> dict[str, Any]:
        nodes = {
            "start": ("start", "Start", 1, None),
            "llm": ("llm", "LLM", 2, "start"),
            "answer": ("answer", "Answer", 3, "llm"),
            "end": ("end", "End", 3, "llm"),
        }
        node_type, title, index, predecessor = nodes[node_id]
        return {
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{run.task_id}:{node_id}")),
            "node_id": node_id,
            "node_type": node_type,
            "title": title,
            "index": index,
            "predecessor_node_id": predecessor,
        }

    _PARALLEL: ClassVar[dict[str, None]] = {
        "parallel_id": None,
        "parallel_start_node_id": None,
        "parent_parallel_id": None,
        "parent_parallel_start_node_id": None,
        "iteration_id": None,
    }

    def _workflow_event(self, run: _Run, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return self._chunk(run, event, task_id=run.task_id, workflow_run_id=self._workflow_run_id(run), data=data)

    def _workflow_started(self, run: _Run) -> dict[str, Any]:
        data = {
            "id": self._workflow_run_id(run),
            "workflow_id": run.app.workflow_id,
            "sequence_number": run.app.runs_started,
            "inputs": self._sys_inputs(run),
            "created_at": run.created_at,
        }
        return self._workflow_event(run, "workflow_started", data)

    def _node_started(self, run: _Run, node_id: str) -> dict[str, Any]:
        data = self._node(run, node_id) | {"inputs": None, "created_at": int(time.time()), "extras": {}}
        return self._workflow_event(run, "node_started", data | self._PARALLEL | {"parallel_run_id": None})

    def _node_finished(self, run: _Run, node_id: str, *, failed: bool = False) -> dict[str, Any]:
        inputs: dict[str, Any] | None = None
        process_data: dict[str, Any] | None = None
        outputs: dict[str, Any] | None = None
        metadata: dict[str, Any] | None = None
        if node_id == "start":
            inputs = outputs = self._sys_inputs(run)
        elif node_id == "llm":
            process_data = {
                "model_mode": "chat",
                "prompts": [
                    {"role": "system", "text": "You are a test assistant.", "files": []},
                    {"role": "user", "text": run.query, "files": []},
                ],
                "model_provider": "openai_api_compatible",
                "model_name": "fake-gpt",
            }
            if not failed:
                usage = run.usage()
                outputs = {"text": run.sent, "usage": usage, "finish_reason": "stop"}
                metadata = {
                    "total_tokens": usage["total_tokens"],
                    "total_price": "0.0000000",
                    "currency": "USD",
                }
        elif node_id == "answer":
            outputs = {"answer": run.sent, "files": []}
        elif node_id == "end":
            inputs = outputs = self._workflow_outputs(run)
        now = int(time.time())
        data = self._node(run, node_id) | {
            "inputs": inputs,
            "process_data": process_data,
            "outputs": outputs,
            "status": "failed" if failed else "succeeded",
            "error": UPSTREAM_FAILURE if failed else None,
            "elapsed_time": round(run.elapsed(), 6),
            "execution_metadata": metadata,
            "created_at": now,
            "finished_at": now,
            "files": [],
        }
        return self._workflow_event(run, "node_finished", data | self._PARALLEL)

    def _workflow_finished(
        self, run: _Run, status: str, outputs: dict[str, Any] | None, error: str | None
    ) -> dict[str, Any]:
        self._finish_workflow_run(run, status, outputs, error)
        succeeded = status == "succeeded"
        data = {
            "id": self._workflow_run_id(run),
            "workflow_id": run.app.workflow_id,
            "sequence_number": run.app.runs_started,
            "status": status,
            "outputs": outputs,
            "error": error,
            "elapsed_time": run.elapsed(),
            "total_tokens": run.usage()["total_tokens"] if succeeded else 0,
            "total_steps": 3 if succeeded else 2,
            "created_by": {"id": self._end_user_id(run.app, run.user), "user": run.user},
            "created_at": run.created_at,
            "finished_at": int(time.time()),
            "exceptions_count": 0,
            "files": [],
        }
        return self._workflow_event(run, "workflow_finished", data)

    async def _workflow_prelude(self, run: _Run, writer: _EventWriter) -> None:
        await writer.send(self._workflow_started(run))
        await writer.send(self._node_started(run, "start"))
        await writer.send(self._node_finished(run, "start"))
        await writer.send(self._node_started(run, "llm"))

    async def _emit_chatflow(self, run: _Run, writer: _EventWriter) -> str:
        """workflow_started, nodes, message×N, nodes, workflow_finished, message_end."""
        await self._workflow_prelude(run, writer)
        outcome = await self._stream_tokens(run, writer, lambda token: self._message(run, token))
        if outcome == _Outcome.ERROR:
            await writer.send(self._node_finished(run, "llm", failed=True))
            await writer.send(self._workflow_finished(run, "failed", None, UPSTREAM_FAILURE))
            await writer.send(self._upstream_error(run, code="invalid_param", prefix="Run failed: "))
            return outcome
        if outcome == _Outcome.STOPPED:
            await writer.send(self._workflow_finished(run, "stopped", None, "Stopped by user."))
            zero = dict.fromkeys(("prompt_tokens", "completion_tokens", "total_tokens"), 0)
            usage = run.usage() | zero | {"latency": 0.0}
            await writer.send(self._message_end(run, usage=usage))
            return outcome
        if outcome != _Outcome.DONE:
            return outcome
        await writer.send(self._node_finished(run, "llm"))
        await writer.send(self._node_started(run, "answer"))
        await writer.send(self._node_finished(run, "answer"))
        if run.behaviour.message_file:
            await writer.send(self._message_file(run))
        await writer.send(self._workflow_finished(run, "succeeded", {"answer": run.sent}, None))
        await self._moderate(run, writer)
        await writer.send(self._message_end(run))
        return outcome

    async def _emit_workflow(self, run: _Run, writer: _EventWriter) -> str:
        """workflow_started, nodes, text_chunk×N (if the End node streams), nodes, workflow_finished."""
        await self._workflow_prelude(run, writer)

        if run.behaviour.workflow_streams_text:
            outcome = await self._stream_tokens(run, writer, lambda token: self._text_chunk(run, token))
        else:
            outcome = self._fault(run, 0) or _Outcome.DONE
            if outcome == _Outcome.DONE:
                run.sent, run.tokens_sent = run.answer, len(split_tokens(run.answer))
        if outcome == _Outcome.ERROR:
            await writer.send(self._node_finished(run, "llm", failed=True))
            await writer.send(self._workflow_finished(run, "failed", None, UPSTREAM_FAILURE))
            return outcome
        if outcome == _Outcome.STOPPED:
            await writer.send(self._workflow_finished(run, "stopped", None, "Stopped by user."))
            return outcome
        if outcome != _Outcome.DONE:
            return outcome
        await writer.send(self._node_finished(run, "llm"))
        await writer.send(self._node_started(run, "end"))
        await self._moderate(run, writer)
        await writer.send(self._node_finished(run, "end"))
        await writer.send(self._workflow_finished(run, "succeeded", self._workflow_outputs(run), None))
        return outcome

    def _text_chunk(self, run: _Run, token: str) -> dict[str, Any]:
        data = {"text": token, "from_variable_selector": ["llm", "text"]}
        return self._chunk(run, "text_chunk", task_id=run.task_id, data=data)

    # --- suggested questions after an answer ----------------------------------------------------------------

    def enable_suggested_questions(self, api_key: str, questions: list[str], *, delay: float = 0.0) -> None:
        """Switch the app's "suggested questions after answer" on: /parameters says so, and
        `GET /messages/:id/suggested` answers `questions` after `delay` seconds."""
        self._suggested[api_key] = (list(questions), delay)

    async def _suggested_questions(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        self._record(request, app, None)
        app = self._authenticate(request)
        if not request.query.get("user"):
            raise DifyHTTPError(400, "invalid_param", "Arg user must be provided.")
        if app.mode not in CHAT_MODES:
            raise DifyHTTPError(400, "not_chat_app", _ROUTE_MISMATCH)
        if app.api_key not in self._suggested:
            # 0.15.x reports a switched-off feature like this (1.x: "Suggested Questions Is Disabled.")
            raise DifyHTTPError(400, "bad_request", "Message Not Exists.")
        questions, delay = self._suggested[app.api_key]
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        return _json_body({"result": "success", "data": questions})

    # --- files apps make (tools, workflow outputs) ----------------------------------------------------------

    def add_tool_file(self, data: bytes, *, extension: str = "png") -> str:
        """Serve `data` as a file a tool made; returns its relative, signed URL, as Dify gives such URLs."""
        name = f"{uuid.uuid4()}.{extension}"
        self.tool_files[name] = data
        signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        return f"/files/tools/{name}?timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"

    def add_workflow_output_file(
        self, api_key: str, variable: str, data: bytes, *, filename: str, mime_type: str, file_type: str = "document"
    ) -> None:
        """Make the workflow app's runs output a file in `variable`, shaped like Dify 0.15's file objects."""
        extension = filename.rpartition(".")[2].lower() if "." in filename else "bin"
        url = self.add_tool_file(data, extension=extension)
        self.output_files.setdefault(api_key, {})[variable] = {
            "dify_model_identity": "__dify__file__", "id": None,
            "tenant_id": str(uuid.uuid5(_ID_NAMESPACE, "tenant")), "type": file_type,
            "transfer_method": "tool_file", "remote_url": None, "related_id": str(uuid.uuid4()),
            "filename": filename, "extension": f".{extension}", "mime_type": mime_type, "size": len(data), "url": url,
        }  # fmt: skip


_ROUTE_MISMATCH = "Please check if your app mode matches the right API route."
_WORKFLOW_MISMATCH = "Please check if your Workflow app mode matches the right API route."
_APP_UNAVAILABLE = "App unavailable, please check your app configurations."


async def start_fake_dify(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ping_interval: float = 10.0,
    default_apps: bool = False,
    **options: Any,
) -> FakeDify:
    """Start a fake Dify on loopback and return it (`.base_url`, controls, `await .close()`)."""
    fake = FakeDify(ping_interval=ping_interval, **options)
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
