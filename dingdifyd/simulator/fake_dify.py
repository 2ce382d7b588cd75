"""A fake Dify Service API on loopback, speaking 0.15.3 or 1.16.1 per app, shaped like the recorded transcripts.

Its answers are byte-shaped like those of a real Dify whose LLM is the capture's fake model (tests/fixtures/dify
for 0.15.3, tests/fixtures/dify-1.16.1 for 1.16.1; dify_dialect.py holds how the two write their bytes): the
same keys in the same order, one `data: <json>\\n\\n` chunk per event, `event: ping\\n\\n` keep-alives, the
error bodies of each version. The fake model answers `Echo: <query> | <tail>` word by word; a query with `slow`
in it gets forty slow words, one with `fail500` fails upstream (an `error` event, or a failed workflow run).

What 1.16.1 adds is served for 1.16.1 apps only: chatflow order (`message_end` before `workflow_finished`),
stops and failures without `message_end`, input validation inside the stream, `reasoning_chunk`, human-input
pauses and their form routes (fake_hitl.py), the run events route (`GET /workflow/:run_id/events`, with its
state snapshot) and runs that go on after their client is gone, so that it can be followed there.

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

from dingdifyd.simulator.dify_dialect import (
    ANSWER_TAILS,
    DIFY_0_15,
    DIFY_1_16,
    Dialect,
    ValidationFailure,
    check_version,
)
from dingdifyd.simulator.fake_hitl import FakeForm, HumanInputNode

log = logging.getLogger(__name__)

DIALECT_KEY = web.RequestKey("dialect", Dialect)  # the version the answer to a request speaks (its app's)
PAYLOAD_MODEL_KEY = web.RequestKey("payload_model", str)  # 1.x: the pydantic model a validation error names

DIFY_VERSION = DIFY_0_15  # the default; FakeDify(version=DIFY_1_16) or add_app(..., version=...) for 1.x
MODES = ("chat", "agent-chat", "advanced-chat", "workflow", "completion")
MODES_1X = (*MODES, "agent")  # 1.x's Dify Agent runtime answers on /chat-messages like an agent-chat app
CHAT_MODES = ("chat", "agent-chat", "advanced-chat", "agent")
WORKFLOW_MODES = ("advanced-chat", "workflow")  # modes with workflow runs (and, in 1.x, the run events route)
ONLY_INFO_MODES = ("channel", "rag-pipeline")  # 1.x modes the fake only names (/info, /parameters)
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

ANSWER_TAIL = ANSWER_TAILS[DIFY_0_15]
UPSTREAM_FAILURES = {
    DIFY_0_15: (
        "[openai_api_compatible] Error: API request failed with status code 500: "
        '{"error": {"message": "fake upstream failure", "type": "server_error"}}'
    ),
    DIFY_1_16: "fake upstream failure (fail500)",
}
UPSTREAM_FAILURE = UPSTREAM_FAILURES[DIFY_0_15]
REASONING = "The user wants an echo; these are reasoning words."
STOPPED_BY_USER = {DIFY_0_15: "Stopped by user.", DIFY_1_16: "Aborted: User requested stop"}
MODERATED_ANSWER = "Sorry, I cannot talk about that."  # the preset answer of `replace_after` without `replace_with`
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
    think: bool = False  # the model reasons first: 1.x workflow-based apps stream it as reasoning_chunk, else <think>
    replace_after: int | None = None  # output moderation after N tokens: the replacement, then no more original text
    answer_file: bool = False  # the answer shows a file: a markdown image in the text, and 1.x's `files` of the end
    steps: tuple[str, ...] = ()  # events before the answer: node_retry, iteration, loop, agent_log, or any name
    stopped_after: int | None = None  # after N tokens someone else (the Dify console) stops the run
    # 1.x only ------------------------------------------------------------------------------------------------
    resume_bug: bool = True  # 1.16.1: a resumed workflow app ends `stopped`, outputs {} (its run record has them)
    events_route_status: int | None = None  # the run events route answers this error status (a proxy, an old Dify)
    hold_for_subscriber: float = 5.0  # a run whose client is gone waits this long for its events route, then goes on


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
    version: str = DIFY_VERSION
    human_input: HumanInputNode | None = None  # 1.x: Start → this node → Answer / End (the capture's hitl apps)

    @property
    def dialect(self) -> Dialect:
        return Dialect(self.version)


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
    status: str = "running"  # running | paused | succeeded | failed | stopped
    outputs: dict[str, Any] | None = None
    error: str | None = None
    total_steps: int = 0
    total_tokens: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    finished_at: int | None = None
    elapsed_time: float = 0.0
    user: str = ""  # the end user who started it: the only one its events route answers
    mode: str = "workflow"
    forms: list[FakeForm] = field(default_factory=list)  # the forms it paused on


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
    stopped_elsewhere: bool = False  # stopped by someone else than the client (the Dify console, another host)
    node_log: list[dict[str, Any]] = field(default_factory=list)  # node events so far (the events route's snapshot)
    form: FakeForm | None = None  # the form it paused on
    resumed: bool = False

    @property
    def dialect(self) -> Dialect:
        return self.app.dialect

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
        return getattr(self._response, "_req", None) and self._response._req.transport  # type: ignore[union-attr]

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
class _Subscription:
    """A client of the run events route: what it is sent, and when its stream ends."""

    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    continue_on_pause: bool = False


class _Outcome:
    DONE = "done"
    STOPPED = "stopped"
    ERROR = "error"
    STALL = "stall"
    CUT = "cut"
    END = "end"
    PAUSED = "paused"  # 1.x: a human input node waits; the stream closes after workflow_paused
    INVALID = "invalid"  # 1.x: the inputs failed validation inside the stream


class FakeDify:
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
        self.version = check_version(version)  # of apps added without one, and of answers to unknown keys
        self.ping_interval = ping_interval
        # a 0.15.3 fake with one 1.x trait each (1.16.1 apps have both anyway)
        self.info_with_mode = info_with_mode  # late 1.x /info carries the app mode; 0.15.3 does not
        self.conversation_error_suffix = conversation_error_suffix  # 1.x appends route hints to the 404
        self.apps: dict[str, FakeApp] = {}
        self.forms: dict[str, FakeForm] = {}  # form token (or form id, without a token) -> form
        self.form_submissions: list[dict[str, Any]] = []  # accepted POST /form/human_input/:token bodies
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
        self._paused: dict[str, _Run] = {}  # workflow run id -> its run, until a form answer resumes it
        self._runs_by_id: dict[str, _Run] = {}  # workflow run id -> its run, while it runs or waits
        self._joined: dict[str, asyncio.Event] = {}  # workflow run id -> set once its events route has a client
        self._subscribers: dict[str, list[_Subscription]] = {}  # workflow run id -> its events route clients
        self._background: set[asyncio.Task[Any]] = set()
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

    def requests_to(self, path_suffix: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    @property
    def answer_tail(self) -> str:
        """How the fake model ends an echo, in this fake's default version."""
        return ANSWER_TAILS[self.version]

    @property
    def running_task_ids(self) -> list[str]:
        return list(self._running)

    def expire_form(self, token: str) -> None:
        """Let a form's time run out (its node's timeout passed): answering or reading it is then 412 expired."""
        self.forms[token].expires_at = time.time() - 1

    def subscribers(self, run_id: str) -> int:
        """How many clients listen on the run's events route right now."""
        return len(self._subscribers.get(run_id, ()))

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
            web.delete("/v1/conversations/{conversation_id}", self._delete_conversation),
            web.get("/v1/workflow/{run_id}/events", self._run_events),
            web.get("/v1/form/human_input/{token}", self._form_get),
            web.post("/v1/form/human_input/{token}", self._form_submit),
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
        body = {"welcome": "Dify OpenAPI", "api_version": "v1", "server_version": self.version}
        return Dialect(self.version).restx_body(body)

    async def _info(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        self._record(request, app, None)
        app = self._authenticate(request)
        info: dict[str, Any] = {"name": app.name, "description": app.description, "tags": []}
        if self.info_with_mode or app.dialect.is_1x:
            info["mode"] = app.mode
            info["author_name"] = "fake" if not app.dialect.is_1x else "admin"
        return app.dialect.restx_body(info)

    async def _meta(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        return app.dialect.restx_body({"tool_icons": {}})

    async def _delete_conversation(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        self._record(request, self._app_of(request), body)
        app = self._authenticate(request)
        user = self._require_user(body)
        if app.mode not in CHAT_MODES:
            raise DifyHTTPError(400, "not_chat_app", _ROUTE_MISMATCH)
        conversation = self.conversations.get(request.match_info["conversation_id"])
        if conversation is None or conversation.app != app.name or conversation.user != user:
            message = "Conversation Not Exists."
            raise DifyHTTPError(404, "not_found", message)
        del self.conversations[conversation.id]
        return app.dialect.no_content()

    async def _parameters(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        methods = ["local_file", "remote_url"]
        parameters = (
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
        if app.dialect.is_1x:  # 03, 04: no `image` section, a shorter moderation section
            if app.mode in WORKFLOW_MODES:
                parameters["file_upload"].pop("image")
            elif not app.file_upload:  # 110b, 120b, 130b: a classic app without uploads has the image section only
                parameters["file_upload"] = {"image": {"detail": "high", "enabled": False, "number_limits": 3,
                                                       "transfer_methods": ["remote_url", "local_file"]}}  # fmt: skip
            parameters["sensitive_word_avoidance"] = {"enabled": False}
            if app.mode == "workflow" and not app.opening_statement:
                parameters["opening_statement"] = None
        return app.dialect.restx_body(parameters)

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
        if not files and app.dialect.is_1x:
            raise DifyHTTPError(400, "no_file_uploaded", "Please upload your file.")
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
        body: dict[str, Any] = {"id": uploaded.id}
        if app.dialect.is_1x:
            body["reference"] = None
        body |= {
            "name": uploaded.name,
            "size": uploaded.size,
            "extension": uploaded.extension,
            "mime_type": uploaded.mime_type,
            "created_by": self._end_user_id(app, user),
            "created_at": int(time.time()),
        }
        if app.dialect.is_1x:  # 10: signed links and the new bookkeeping fields
            body |= {
                "preview_url": None, "source_url": self._signed_preview(uploaded.id), "original_url": None,
                "user_id": None, "tenant_id": str(uuid.uuid5(_ID_NAMESPACE, "tenant")), "conversation_id": None,
                "file_key": None,
            }  # fmt: skip
        return app.dialect.restx_body(body, 201)

    def _signed_preview(self, file_id: str) -> str:
        signature = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        query = f"timestamp={int(time.time())}&nonce={secrets.token_hex(16)}&sign={signature}"
        return f"{self.public_url}/files/{file_id}/file-preview?{query}"

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
            raise _not_workflow_app(app.dialect)
        run = self.workflow_runs.get(request.match_info["run_id"])
        if run is None or run.app != app.name:
            raise DifyHTTPError(404, "not_found", "Workflow run not found.")
        if app.dialect.is_1x:  # 84, 60b, 66b: outputs an object, times in unix seconds
            inputs = _with_timestamp(run)
            return app.dialect.restx_body({
                "id": run.id, "workflow_id": run.workflow_id, "status": run.status, "inputs": json.dumps(inputs),
                "outputs": run.outputs if run.outputs is not None else {}, "error": run.error,
                "total_steps": run.total_steps, "total_tokens": run.total_tokens, "created_at": run.created_at,
                "finished_at": run.finished_at, "elapsed_time": run.elapsed_time,
            })  # fmt: skip
        return app.dialect.restx_body(
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
        return await self._stop(request, ("workflow",), _not_workflow_app(self._dialect_of(request)))

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
        return app.dialect.restx_body({"result": "success"})

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
        if app.mode in ONLY_INFO_MODES:  # a 1.x channel or rag-pipeline app: no generation route takes its key
            raise DifyHTTPError(400, "app_unavailable", _APP_UNAVAILABLE)
        self._check_route(app, endpoint)
        request[PAYLOAD_MODEL_KEY] = _PAYLOAD_MODELS[endpoint]
        query, streaming, conversation_id = self._parse_args(app, endpoint, body)
        behaviour = self._behaviour_for(app)
        limit = behaviour.max_active_streams
        if limit is not None and sum(1 for r in self._running.values() if r.app is app) >= limit:
            message = (
                "Too many requests. Please try again later. The current maximum concurrent requests allowed "
                f"for {app.id} is {limit}."
            )
            raise DifyHTTPError(429, "too_many_requests", message)
        if app.mode in ("agent-chat", "agent") and not streaming:
            raise DifyHTTPError(400, "invalid_param", "Agent Chat App does not support blocking mode")
        conversation = self._find_conversation(app, user, conversation_id) if app.mode in CHAT_MODES else None
        try:
            inputs = self._validate_inputs(app, body.get("inputs") or {})
            files = self._validate_files(body.get("files"))
        except DifyHTTPError as exc:
            # 1.x checks a workflow-based app's inputs inside its run: the stream says so (82, 28)
            if not (app.dialect.is_1x and app.mode in WORKFLOW_MODES and streaming):
                raise
            self._consume_next_request(app)
            return await self._stream_invalid(request, app, str(exc))
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
            answer=self._answer_for(app, behaviour, text_query, conversation, slow),
            token_delay=behaviour.slow_token_delay if slow else behaviour.token_delay,
            fails_upstream="fail500" in text_query,
            conversation=conversation,
            files=files,
        )
        if conversation is not None:
            conversation.queries.append(query)
        if app.mode == "workflow" or (app.mode == "advanced-chat" and app.dialect.is_1x):
            app.runs_started += 1
            run.workflow_run = WorkflowRun(
                id=str(uuid.uuid4()), app=app.name, workflow_id=app.workflow_id, inputs={}, user=user,
                mode=app.mode,
            )  # fmt: skip
            run.workflow_run.inputs = self._sys_inputs(run)
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
            raise _not_workflow_app(app.dialect)

    def _parse_args(self, app: FakeApp, endpoint: str, body: dict[str, Any]) -> tuple[str, bool, str]:
        """flask-restful reqparse (0.15) or pydantic (1.x), in the order Dify declares the fields: the first
        problem wins (worded by the app's dialect)."""
        if not isinstance(body.get("inputs"), dict):
            raise ValidationFailure("inputs", "missing", body=body)
        query = body.get("query")
        if endpoint == "chat" and query is None:
            raise ValidationFailure("query", "missing", body=body)
        if query is not None and not isinstance(query, str):
            query = str(query)
        mode = body.get("response_mode")
        if mode is not None and mode not in ("blocking", "streaming"):
            raise ValidationFailure("response_mode", "bad_choice", value=mode)
        conversation_id = body.get("conversation_id") or ""
        if endpoint == "chat" and conversation_id and not _is_uuid(str(conversation_id)):
            raise ValidationFailure("conversation_id", "not_uuid", value=conversation_id)
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
            if self.conversation_error_suffix or app.dialect.is_1x:
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
    def _answer_for(
        app: FakeApp, behaviour: Behaviour, query: str, conversation: Conversation | None, slow: bool
    ) -> str:
        tail = app.dialect.answer_tail
        if behaviour.answer is not None:
            return behaviour.answer
        if slow:
            return "Slow answer: " + " ".join(f"word{i}" for i in range(40))
        if behaviour.mention_turn and conversation is not None:
            turn = len(conversation.queries) + 1
            return f"Echo: {query} | Turn {turn} of this conversation. {tail}"
        return f"Echo: {query} | {tail}"

    def _sys_inputs(self, run: _Run) -> dict[str, Any]:
        inputs = dict(run.inputs)
        if run.app.mode == "advanced-chat":
            inputs["sys.query"] = run.query
        inputs["sys.files"] = [self._file_variable(file) for file in run.files]
        if run.conversation is not None and not run.dialect.is_1x:
            inputs["sys.conversation_id"] = run.conversation.id
        inputs["sys.user_id"] = run.user
        if run.conversation is not None:
            # 0.15 counts the answers before this turn, 1.x the turns including it (70: 1 on the first)
            turns = run.conversation.queries if run.dialect.is_1x else run.conversation.answers
            inputs["sys.dialogue_count"] = len(turns)
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
        dialect = run.dialect
        failure = UPSTREAM_FAILURES[run.app.version]
        if run.fails_upstream and not (dialect.is_1x and run.app.mode == "workflow"):
            if dialect.is_1x and run.app.mode == "advanced-chat":
                raise DifyHTTPError(400, "invalid_param", f"Run failed: {failure}")  # 105b
            raise DifyHTTPError(400, "completion_request_error", failure)
        if run.app.human_input is not None:
            return self._blocking_pause(run)
        status, outputs, error = "succeeded", None, None
        if run.fails_upstream:  # a 1.x workflow: 200 with the failed run (144b)
            status, outputs, error = "failed", {}, failure
        else:
            run.sent = run.answer
            run.tokens_sent = len(split_tokens(run.answer))
            self._finish_conversation(run)
        if run.workflow_run is not None and run.app.mode == "workflow":
            self._finish_workflow_run(run, status, self._workflow_outputs(run) if outputs is None else outputs, error)
            return dialect.blocking_body(
                {"task_id": run.task_id, "workflow_run_id": run.workflow_run.id, "data": self._run_data(run)}
            )
        if run.workflow_run is not None:
            self._finish_workflow_run(run, "succeeded", {"answer": run.sent, "files": []}, None)
        answer: dict[str, Any] = {"event": "message", "task_id": run.task_id, "id": run.message_id}
        answer["message_id"] = run.message_id
        if run.conversation is not None:
            answer["conversation_id"] = run.conversation.id
        answer |= {"mode": run.app.mode, "answer": run.answer, "metadata": self._metadata(run, blocking=True)}
        answer["created_at"] = run.created_at
        return dialect.blocking_body(answer)

    def _run_data(self, run: _Run) -> dict[str, Any]:
        wf = run.workflow_run
        assert wf is not None
        outputs = wf.outputs if wf.outputs is not None or not run.dialect.is_1x else {}
        return {
            "id": wf.id, "workflow_id": wf.workflow_id, "status": wf.status, "outputs": outputs,
            "error": wf.error, "elapsed_time": wf.elapsed_time, "total_tokens": wf.total_tokens,
            "total_steps": wf.total_steps, "created_at": wf.created_at, "finished_at": wf.finished_at,
        }  # fmt: skip

    def _blocking_pause(self, run: _Run) -> web.Response:
        """1.x: a run that reaches a Human Input node answers at once with the pause (68 workflow, 78 chatflow)."""
        form = self._open_form(run)
        wf = run.workflow_run
        assert wf is not None
        reasons = [form.reason()]
        if run.app.mode == "workflow":
            data = self._run_data(run) | {"paused_nodes": [form.node.node_id], "reasons": reasons}
            return run.dialect.blocking_body({"task_id": run.task_id, "workflow_run_id": wf.id, "data": data})
        metadata = {"annotation_reply": None, "retriever_resources": [], "usage": None, "reasoning": {}}
        head = {"id": run.message_id, "mode": run.app.mode, "conversation_id": run.conversation_id,
                "message_id": run.message_id, "workflow_run_id": wf.id, "answer": "", "metadata": metadata,
                "created_at": run.created_at}  # fmt: skip
        data = head | {"paused_nodes": [form.node.node_id], "reasons": reasons, "status": "paused",
                       "elapsed_time": run.elapsed(), "total_tokens": 0, "total_steps": 2}  # fmt: skip
        body = {"event": "workflow_paused", "task_id": run.task_id, "id": run.message_id,
                "message_id": run.message_id, "conversation_id": run.conversation_id, "mode": run.app.mode,
                "answer": "", "metadata": metadata, "created_at": run.created_at, "workflow_run_id": wf.id,
                "data": data}  # fmt: skip
        return run.dialect.blocking_body(body)

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
        self._runs_by_id.pop(wf.id, None)

    def _workflow_outputs(self, run: _Run) -> dict[str, Any]:
        if run.dialect.is_1x:  # the capture's llm-workflow ends with answer = llm.text
            outputs: dict[str, Any] = {"answer": run.sent}
            if run.behaviour.answer_file:
                outputs["files"] = [self._answer_file_object(run)]
            return outputs | self.output_files.get(run.app.api_key, {})
        return {"answer": run.sent, "echo_query": run.query, **self.output_files.get(run.app.api_key, {})}

    # --- streaming ----------------------------------------------------------------------------------------

    async def _stream(self, request: web.Request, run: _Run) -> web.StreamResponse:
        response = web.StreamResponse(headers=run.dialect.stream_headers())
        response.enable_chunked_encoding()
        await response.prepare(request)
        writer = self._writer(run, response)
        if run.dialect.leading_ping(run.app.mode):
            await response.write(b"event: ping\n\n")
        writer.start_pings(self.ping_interval)
        self._running[run.task_id] = run
        self.generations_in_flight += 1
        self.max_generations_in_flight = max(self.max_generations_in_flight, self.generations_in_flight)
        emitters = {
            "chat": self._emit_chat,
            "agent-chat": self._emit_agent,
            "agent": self._emit_agent,
            "advanced-chat": self._emit_chatflow,
            "workflow": self._emit_workflow,
            "completion": self._emit_chat,
        }
        try:
            outcome = await emitters[run.app.mode](run, writer)
            await writer.stop_pings()
            if outcome in (_Outcome.DONE, _Outcome.STOPPED) and writer.lost is not None:
                self._finish_conversation(run)  # 1.x: the run went on without its client, and ended
            if outcome == _Outcome.STALL or writer.lost == "stall":
                await self._linger(request, None)
            elif outcome == _Outcome.CUT or writer.lost in ("cut", "end", "gone"):
                if request.transport is not None and writer.lost != "end":
                    request.transport.close()
                return response
            elif outcome in (_Outcome.DONE, _Outcome.STOPPED) and run.behaviour.hold_open_after_end > 0:
                await self._linger(request, run.behaviour.hold_open_after_end)
            if outcome in (_Outcome.DONE, _Outcome.STOPPED) and writer.lost is None:
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

    def _writer(self, run: _Run, response: web.StreamResponse | None) -> _EventWriter:
        run_id = run.workflow_run.id if run.workflow_run is not None else ""
        if run.workflow_run is not None:
            self._runs_by_id[run_id] = run
        return _EventWriter(response, run.dialect, lambda obj: self._publish(run_id, obj))

    async def _stream_invalid(self, request: web.Request, app: FakeApp, error: str) -> web.StreamResponse:
        """1.x refuses a workflow-based app's inputs inside a stream that names no conversation (82, 28)."""
        response = web.StreamResponse(headers=app.dialect.stream_headers())
        response.enable_chunked_encoding()
        await response.prepare(request)
        run_id = str(uuid.uuid4())
        now = int(time.time())
        head = {"task_id": run_id, "workflow_run_id": run_id}
        started = {"event": "workflow_started", **head,
                   "data": {"id": run_id, "workflow_id": app.workflow_id, "inputs": {}, "created_at": now,
                            "reason": "initial"}}  # fmt: skip
        finished = {"event": "workflow_finished", **head,
                    "data": {"id": run_id, "workflow_id": app.workflow_id, "status": "failed", "outputs": None,
                             "error": error, "elapsed_time": 0.0, "total_tokens": 0, "total_steps": 0,
                             "created_by": {}, "created_at": now, "finished_at": now, "exceptions_count": 1,
                             "files": []}}  # fmt: skip
        with contextlib.suppress(ConnectionError):
            await response.write(b"event: ping\n\n")
            await response.write(app.dialect.chunk(started))
            await response.write(app.dialect.chunk(finished))
            await response.write_eof()
        return response

    def _fault(self, run: _Run, index: int) -> str | None:
        b = run.behaviour
        if run.fails_upstream and index == 0:
            return _Outcome.ERROR
        if b.stopped_after is not None and b.stopped_after == index:
            run.stopped_elsewhere = True  # the Dify console (or another host) stopped it
            run.stop.set()
            return _Outcome.STOPPED
        for outcome, after in (
            (_Outcome.ERROR, b.error_after),
            (_Outcome.STALL, b.stall_after),
            (_Outcome.CUT, b.cut_after),
            (_Outcome.END, b.end_after),
        ):
            if after is not None and after == index:
                return outcome
        return None

    def _tokens(self, run: _Run) -> list[tuple[str, str]]:
        """What the fake model streams: ("reasoning", text) first when it thinks and the app separates reasoning
        (1.x chatflow / workflow), else the `<think>` block as text; then ("text", token)s."""
        tokens = [("text", token) for token in split_tokens(run.answer)]
        if not run.behaviour.think:
            return tokens
        if self._separates_reasoning(run):
            return [("reasoning", t) for t in ["\n", *split_tokens(REASONING)[:-1], "\n"]] + tokens
        think = ["<think>\n", *split_tokens(REASONING)[:-1], "\n</think>\n\n"]
        return [("text", t) for t in think] + tokens

    @staticmethod
    def _separates_reasoning(run: _Run) -> bool:
        return run.dialect.is_1x and run.app.mode in WORKFLOW_MODES

    async def _stream_tokens(self, run: _Run, writer: _EventWriter, make_event: Callable[[str], dict[str, Any]]) -> str:
        tokens = self._tokens(run)
        index = 0  # of text tokens: faults and moderation count those
        for position, (kind, token) in enumerate(tokens):
            if kind == "reasoning":
                await writer.send(self._reasoning(run, token, final=False))
                continue
            fault = self._fault(run, index)
            if fault in (_Outcome.CUT, _Outcome.STALL, _Outcome.END) and self._follows(run):
                await self._lose_client(run, writer, fault)
                fault = None
            if fault is not None:
                return fault
            if self._closing.is_set():
                return _Outcome.CUT
            if run.stop.is_set():
                return _Outcome.STOPPED
            if run.behaviour.replace_after is not None and index == run.behaviour.replace_after:
                await self._moderate(run, writer)
                return _Outcome.DONE  # moderated: nothing more of the original answer
            latency = run.behaviour.first_token_delay if index == 0 else 0.0
            if latency and await self._pause(run, latency):
                return _Outcome.CUT if self._closing.is_set() else _Outcome.STOPPED
            last = position == len(tokens) - 1
            if last and run.behaviour.think and self._separates_reasoning(run):
                await writer.send(self._reasoning(run, "", final=True))  # 104: before the closing empty message
            if last and run.behaviour.answer_file:
                await writer.send(make_event(self._answer_file_markdown(run)))
                run.sent += self._answer_file_markdown(run)
            await writer.send(make_event(token))
            if index == 0:
                self.first_text_at.setdefault(run.user, time.monotonic())  # for the latency benchmark
            run.sent += token
            run.tokens_sent += 1
            index += 1
            if not last and await self._pause(run, run.token_delay):
                return _Outcome.CUT if self._closing.is_set() else _Outcome.STOPPED
        return self._fault(run, index) or _Outcome.DONE

    def _follows(self, run: _Run) -> bool:
        """1.x keeps a workflow-based run going when its client is lost: its events route can follow it."""
        return run.dialect.is_1x and run.workflow_run is not None

    async def _lose_client(self, run: _Run, writer: _EventWriter, how: str) -> None:
        """The client loses the stream (a proxy cut it, it went silent, it ended cleanly); the run goes on once
        someone listens on its events route, or after `hold_for_subscriber`."""
        if how == _Outcome.END:
            with contextlib.suppress(ConnectionError):
                await writer.end_client()
        writer.detach(how)
        await writer.stop_pings()
        if how == _Outcome.CUT and writer.transport is not None:
            writer.transport.close()
        assert run.workflow_run is not None
        await self._wait_subscriber(run.workflow_run.id, run.behaviour.hold_for_subscriber)

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

    def _message(self, run: _Run, token: str, selector: list[str] | None = None) -> dict[str, Any]:
        if selector is None:
            if run.app.mode == "advanced-chat":
                selector = ["llm", "text"]
            elif run.dialect.is_1x:
                selector = []
        return self._chunk(
            run, "message", task_id=run.task_id, id=run.message_id, answer=token, from_variable_selector=selector
        )

    def _reasoning(self, run: _Run, text: str, *, final: bool) -> dict[str, Any]:
        message_id = run.message_id if run.app.mode != "workflow" else None
        data = {"message_id": message_id, "reasoning": text, "node_id": "llm", "is_final": final}
        return self._chunk(run, "reasoning_chunk", task_id=run.task_id, data=data)

    def _metadata(self, run: _Run, *, usage: dict[str, Any] | None = None, blocking: bool = False) -> dict[str, Any]:
        usage = usage or run.usage()
        if not run.dialect.is_1x:
            return {"usage": usage}
        metadata: dict[str, Any] = {}
        if run.app.mode == "advanced-chat" or blocking:
            metadata["annotation_reply"] = None
        if run.app.mode == "advanced-chat" or blocking:
            timing = {"time_to_first_token": None, "time_to_generate": None} if blocking else {
                "time_to_first_token": 0.05, "time_to_generate": round(run.elapsed(), 3)}
            usage = usage | timing
        reasoning = {"llm": REASONING} if run.behaviour.think and self._separates_reasoning(run) else {}
        return metadata | {"retriever_resources": [], "usage": usage, "reasoning": reasoning}

    def _message_end(self, run: _Run, *, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if run.dialect.is_1x:
            files: list[Any] | None = [self._answer_file_object(run)] if run.behaviour.answer_file else []
        else:
            files = [] if run.app.mode == "advanced-chat" else None
        return self._chunk(
            run, "message_end", task_id=run.task_id, id=run.message_id, metadata=self._metadata(run, usage=usage),
            files=files,
        )  # fmt: skip

    def _upstream_error(self, run: _Run, *, code: str = "completion_request_error", prefix: str = "") -> dict[str, Any]:
        failure = UPSTREAM_FAILURES[run.app.version]
        return self._chunk(run, "error", code=code, status=400, message=prefix + failure)

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

    def _answer_upload(self, run: _Run) -> UploadedFile:
        """The picture an answer shows (`answer_file`): an uploaded file, served as its signed preview (26b)."""
        key = f"answer-file:{run.task_id}"
        uploaded = self.uploads.get(key)
        if uploaded is None:
            uploaded = UploadedFile(id=str(uuid.uuid4()), name="chart.png", size=len(TOOL_IMAGE), extension="png",
                                    mime_type="image/png", user=run.user, data=TOOL_IMAGE)  # fmt: skip
            self.uploads[key] = self.uploads[uploaded.id] = uploaded
        return uploaded

    def _answer_file_markdown(self, run: _Run) -> str:
        uploaded = self._answer_upload(run)
        return f" ![{uploaded.name}]({self._signed_preview(uploaded.id)})"

    def _answer_file_object(self, run: _Run) -> dict[str, Any]:
        """1.x's File object of the same picture, signed anew (so its URL differs from the markdown's)."""
        uploaded = self._answer_upload(run)
        reference = base64.b64encode(json.dumps({"record_id": uploaded.id}).encode()).decode()
        return {
            "dify_model_identity": "__dify__file__", "id": None, "type": "image", "transfer_method": "local_file",
            "remote_url": "", "reference": f"dify-file-ref:{reference}", "filename": uploaded.name,
            "extension": ".png", "mime_type": uploaded.mime_type, "size": uploaded.size, "related_id": uploaded.id,
            "url": self._signed_preview(uploaded.id),
        }  # fmt: skip

    async def _moderate(self, run: _Run, writer: _EventWriter) -> None:
        replacement = run.behaviour.replace_with
        if replacement is None:
            if run.behaviour.replace_after is None:
                return
            replacement = MODERATED_ANSWER
        run.sent = replacement
        if run.app.mode == "workflow":
            await writer.send(self._chunk(run, "text_replace", task_id=run.task_id, data={"text": replacement}))
        elif run.dialect.is_1x:
            body = {"task_id": run.task_id, "answer": replacement, "reason": "output_moderation"}
            await writer.send(self._chunk(run, "message_replace", **body))
        else:
            await writer.send(self._chunk(run, "message_replace", task_id=run.task_id, answer=replacement))

    async def _emit_steps(self, run: _Run, writer: _EventWriter) -> None:
        """Step events a test asks for (`steps`), before the answer: what the bridge shows as progress."""
        for step in run.behaviour.steps:
            for event in self._step_events(run, step):
                await writer.send(event)

    def _step_events(self, run: _Run, step: str) -> list[dict[str, Any]]:
        now = int(time.time())
        head = {"task_id": run.task_id, "workflow_run_id": self._workflow_run_id(run)}
        if step == "node_retry":
            data = self._node(run, "llm") | {
                "inputs": None, "inputs_truncated": False, "process_data": None, "process_data_truncated": False,
                "outputs": None, "outputs_truncated": False, "status": "retry", "error": "Rate limited",
                "elapsed_time": 0.1, "execution_metadata": None, "created_at": now, "finished_at": now, "files": [],
                "iteration_id": None, "loop_id": None, "retry_index": 1,
            }  # fmt: skip
            return [self._chunk(run, "node_retry", **head, data=data)]
        if step in ("iteration", "loop"):
            node = {"id": str(uuid.uuid4()), "node_id": step, "node_type": step, "title": f"Each {step} item"}
            return [
                self._chunk(run, f"{step}_started", **head, data=node | {"created_at": now, "extras": {}}),
                self._chunk(run, f"{step}_next", **head, data=node | {"index": 1, "created_at": now, "extras": {}}),
                self._chunk(run, f"{step}_completed", **head,
                            data=node | {"outputs": {}, "created_at": now, "status": "succeeded",
                                         "elapsed_time": 0.1, "total_tokens": 0, "finished_at": now, "steps": 2}),
            ]  # fmt: skip
        if step == "agent_log":
            data = {"node_execution_id": str(uuid.uuid4()), "id": str(uuid.uuid4()), "label": "ROUND 1",
                    "parent_id": None, "error": None, "status": "start", "data": {}, "metadata": {},
                    "node_id": "agent"}  # fmt: skip
            return [self._chunk(run, "agent_log", task_id=run.task_id, data=data)]
        return [self._chunk(run, step, task_id=run.task_id, data={"note": "an event of a Dify to come"})]

    async def _emit_chat(self, run: _Run, writer: _EventWriter) -> str:
        """chat and completion apps: message×N, message_end."""
        await self._emit_steps(run, writer)
        outcome = await self._stream_tokens(run, writer, lambda token: self._message(run, token))
        if outcome == _Outcome.ERROR:
            await writer.send(self._upstream_error(run))
        if outcome not in (_Outcome.DONE, _Outcome.STOPPED):
            return outcome
        if run.behaviour.message_file:
            await writer.send(self._message_file(run))
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        usage = self._stopped_usage(run) if outcome == _Outcome.STOPPED else None
        await writer.send(self._message_end(run, usage=usage))
        return outcome

    def _stopped_usage(self, run: _Run) -> dict[str, Any]:
        zero = dict.fromkeys(("prompt_tokens", "completion_tokens", "total_tokens"), 0)
        return run.usage() | zero | {"latency": 0.0}

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
        if run.fails_upstream and run.dialect.is_1x:  # 124: the model fails before the first thought
            await writer.send(self._upstream_error(run))
            return _Outcome.ERROR
        await writer.send(self._thought(run, thought_id, position))
        await self._emit_steps(run, writer)
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
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        usage = self._stopped_usage(run) if outcome == _Outcome.STOPPED else None
        await writer.send(self._message_end(run, usage=usage))
        return outcome

    # workflow events ------------------------------------------------------------------------------------

    def _node(self, run: _Run, node_id: str) -> dict[str, Any]:
        review = run.form.node if run.form is not None else run.app.human_input
        nodes = {
            "start": ("start", "Start", 1, None),
            "llm": ("llm", "LLM", 2, "start"),
            "answer": ("answer", "Answer", 3, "llm"),
            "end": ("end", "End", 3, "llm"),
        }
        if review is not None:
            nodes[review.node_id] = ("human-input", review.title, 2, "start")
        node_type, title, index, predecessor = nodes[node_id]
        node = {
            "id": str(uuid.uuid5(_ID_NAMESPACE, f"{run.task_id}:{node_id}")),
            "node_id": node_id,
            "node_type": node_type,
            "title": title,
            "index": index,
            "predecessor_node_id": predecessor,
        }
        if run.dialect.is_1x:  # 1.x numbers every node 1 and names no predecessor (101)
            node |= {"index": 1, "predecessor_node_id": None}
        return node

    _PARALLEL: ClassVar[dict[str, None]] = {
        "parallel_id": None,
        "parallel_start_node_id": None,
        "parent_parallel_id": None,
        "parent_parallel_start_node_id": None,
        "iteration_id": None,
    }

    def _workflow_event(self, run: _Run, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return self._chunk(run, event, task_id=run.task_id, workflow_run_id=self._workflow_run_id(run), data=data)

    def _workflow_started(self, run: _Run, *, reason: str = "initial") -> dict[str, Any]:
        if run.dialect.is_1x:
            data = {"id": self._workflow_run_id(run), "workflow_id": run.app.workflow_id,
                    "inputs": self._sys_inputs(run), "created_at": int(time.time()), "reason": reason}  # fmt: skip
            return self._workflow_event(run, "workflow_started", data)
        data = {
            "id": self._workflow_run_id(run),
            "workflow_id": run.app.workflow_id,
            "sequence_number": run.app.runs_started,
            "inputs": self._sys_inputs(run),
            "created_at": run.created_at,
        }
        return self._workflow_event(run, "workflow_started", data)

    def _node_started(self, run: _Run, node_id: str) -> dict[str, Any]:
        now = int(time.time())
        run.node_log.append({"node_id": node_id, "status": "running", "created_at": now, "finished_at": now})
        if run.dialect.is_1x:
            data = self._node(run, node_id) | {"inputs": None, "inputs_truncated": False, "created_at": now,
                                               "extras": {}, "iteration_id": None, "loop_id": None,
                                               "agent_strategy": None}  # fmt: skip
            return self._workflow_event(run, "node_started", data)
        data = self._node(run, node_id) | {"inputs": None, "created_at": now, "extras": {}}
        return self._workflow_event(run, "node_started", data | self._PARALLEL | {"parallel_run_id": None})

    def _node_finished(
        self, run: _Run, node_id: str, *, failed: bool = False, outputs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        inputs: dict[str, Any] | None = None
        process_data: dict[str, Any] | None = None
        metadata: dict[str, Any] | None = None
        is_1x = run.dialect.is_1x
        failure = UPSTREAM_FAILURES[run.app.version]
        if node_id == "start":
            inputs = outputs = self._start_inputs(run)
        elif node_id == "llm" and failed and is_1x:  # 105: the provider was named, nothing else happened
            inputs = {"model_provider": "dingdifyd/fakellm/fakellm", "model_name": "fake-gpt"}
        elif node_id == "llm":
            provider = "dingdifyd/fakellm/fakellm" if is_1x else "openai_api_compatible"
            inputs = {"model_provider": provider, "model_name": "fake-gpt"} if is_1x else None
            process_data = {
                "model_mode": "chat",
                "prompts": [
                    {"role": "system", "text": "You are a test assistant.", "files": []},
                    {"role": "user", "text": run.query, "files": []},
                ],
                "model_provider": provider,
                "model_name": "fake-gpt",
            }
            if not failed:
                usage = run.usage()
                if is_1x:
                    usage = usage | {"time_to_first_token": 0.05, "time_to_generate": round(run.elapsed(), 3)}
                    process_data = {"model_mode": "chat", "prompts": process_data["prompts"], "usage": usage,
                                    "finish_reason": "stop", "model_provider": provider, "model_name": "fake-gpt"}
                    reasoning = REASONING if run.behaviour.think and self._separates_reasoning(run) else ""
                    outputs = {"text": run.sent, "reasoning_content": reasoning, "usage": usage,
                               "finish_reason": "stop"}  # fmt: skip
                else:
                    outputs = {"text": run.sent, "usage": usage, "finish_reason": "stop"}
                metadata = {
                    "total_tokens": usage["total_tokens"],
                    "total_price": "0.0000000",
                    "currency": "USD",
                }
        elif node_id == "answer":
            inputs = {} if is_1x else None
            outputs = outputs if outputs is not None else {"answer": run.sent, "files": []}
        elif node_id == "end":
            inputs = outputs = outputs if outputs is not None else self._workflow_outputs(run)
        elif outputs is not None:  # the human input node, once answered
            inputs = {name: {"value_type": "string", "value": value} for name, value in outputs.items()
                      if not name.startswith("__") and isinstance(value, str)}  # fmt: skip
        now = int(time.time())
        status = "failed" if failed else "succeeded"
        for entry in reversed(run.node_log):
            if entry["node_id"] == node_id:
                entry.update(status=status, finished_at=now)
                break
        if is_1x:
            data = self._node(run, node_id) | {
                "inputs": inputs if inputs is not None else {}, "inputs_truncated": False,
                "process_data": process_data if process_data is not None else {}, "process_data_truncated": False,
                "outputs": outputs if outputs is not None else {}, "outputs_truncated": False, "status": status,
                "error": failure if failed else None, "elapsed_time": round(run.elapsed(), 6),
                "execution_metadata": metadata, "created_at": now, "finished_at": now, "files": [],
                "iteration_id": None, "loop_id": None,
            }  # fmt: skip
            return self._workflow_event(run, "node_finished", data)
        data = self._node(run, node_id) | {
            "inputs": inputs,
            "process_data": process_data,
            "outputs": outputs,
            "status": status,
            "error": failure if failed else None,
            "elapsed_time": round(run.elapsed(), 6),
            "execution_metadata": metadata,
            "created_at": now,
            "finished_at": now,
            "files": [],
        }
        return self._workflow_event(run, "node_finished", data | self._PARALLEL)

    def _start_inputs(self, run: _Run) -> dict[str, Any]:
        if run.dialect.is_1x:  # 1.x's start node shows the user inputs only (101, 60)
            return dict(run.inputs)
        return self._sys_inputs(run)

    def _workflow_finished(
        self, run: _Run, status: str, outputs: dict[str, Any] | None, error: str | None,
        *, record: tuple[str, dict[str, Any] | None, str | None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The event; `record` is what the run record says instead (1.16.1's resumed workflows, 66b)."""
        self._finish_workflow_run(run, *(record or (status, outputs, error)))
        succeeded = status == "succeeded"
        if run.dialect.is_1x:
            files = outputs.get("files", []) if isinstance(outputs, dict) and run.app.mode == "advanced-chat" else []
            if run.app.mode == "workflow" and isinstance(outputs, dict):
                files = [f for f in outputs.get("files", []) if isinstance(f, dict)]
            data = {
                "id": self._workflow_run_id(run), "workflow_id": run.app.workflow_id, "status": status,
                "outputs": outputs, "error": error, "elapsed_time": run.elapsed(),
                "total_tokens": run.usage()["total_tokens"] if succeeded else 0, "total_steps": 3 if succeeded else 2,
                "created_by": {"id": self._end_user_id(run.app, run.user), "user": run.user},
                "created_at": run.created_at, "finished_at": int(time.time()),
                "exceptions_count": 1 if status == "failed" else 0, "files": files,
            }  # fmt: skip
            return self._workflow_event(run, "workflow_finished", data)
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
        if run.app.human_input is None:
            await writer.send(self._node_started(run, "llm"))

    async def _emit_chatflow(self, run: _Run, writer: _EventWriter) -> str:
        """workflow_started, nodes, message×N, nodes, then message_end and workflow_finished (0.15.3: the other
        way round); a 1.x human input node pauses the run instead."""
        await self._workflow_prelude(run, writer)
        if run.app.human_input is not None:
            return await self._pause_at_form(run, writer)
        await self._emit_steps(run, writer)
        outcome = await self._stream_tokens(run, writer, lambda token: self._message(run, token))
        is_1x = run.dialect.is_1x
        if outcome == _Outcome.ERROR:
            await writer.send(self._node_finished(run, "llm", failed=True))
            failure = UPSTREAM_FAILURES[run.app.version]
            await writer.send(self._workflow_finished(run, "failed", {} if is_1x else None, failure))
            if not is_1x:  # 1.x sends no error event after a failed chatflow (105)
                await writer.send(self._upstream_error(run, code="invalid_param", prefix="Run failed: "))
            return outcome
        if outcome == _Outcome.STOPPED:
            stopped = STOPPED_BY_USER[run.app.version]
            await writer.send(self._workflow_finished(run, "stopped", {} if is_1x else None, stopped))
            if not is_1x:  # 1.x ends a stopped chatflow without message_end (36, 108)
                await writer.send(self._message_end(run, usage=self._stopped_usage(run)))
            return outcome
        if outcome != _Outcome.DONE:
            return outcome
        await writer.send(self._node_finished(run, "llm"))
        await writer.send(self._node_started(run, "answer"))
        await writer.send(self._node_finished(run, "answer"))
        if run.behaviour.message_file:
            await writer.send(self._message_file(run))
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        outputs: dict[str, Any] = {"answer": run.sent, "files": []}
        if is_1x and run.behaviour.answer_file:
            outputs["files"] = [self._answer_file_object(run)]
        if is_1x:  # message_end first (20, 101)
            await writer.send(self._message_end(run))
            await writer.send(self._workflow_finished(run, "succeeded", outputs, None))
        else:
            await writer.send(self._workflow_finished(run, "succeeded", {"answer": run.sent}, None))
            await writer.send(self._message_end(run))
        return outcome

    async def _emit_workflow(self, run: _Run, writer: _EventWriter) -> str:
        """workflow_started, nodes, text_chunk×N (if the End node streams), nodes, workflow_finished."""
        await self._workflow_prelude(run, writer)
        if run.app.human_input is not None:
            return await self._pause_at_form(run, writer)
        await self._emit_steps(run, writer)
        is_1x = run.dialect.is_1x
        if run.behaviour.workflow_streams_text:
            outcome = await self._stream_tokens(run, writer, lambda token: self._text_chunk(run, token))
        else:
            outcome = self._fault(run, 0) or _Outcome.DONE
            if outcome == _Outcome.DONE:
                run.sent, run.tokens_sent = run.answer, len(split_tokens(run.answer))
        if outcome == _Outcome.ERROR:
            await writer.send(self._node_finished(run, "llm", failed=True))
            failure = UPSTREAM_FAILURES[run.app.version]
            await writer.send(self._workflow_finished(run, "failed", {} if is_1x else None, failure))
            return outcome
        if outcome == _Outcome.STOPPED:
            stopped = STOPPED_BY_USER[run.app.version]
            await writer.send(self._workflow_finished(run, "stopped", {} if is_1x else None, stopped))
            return outcome
        if outcome != _Outcome.DONE:
            return outcome
        await writer.send(self._node_finished(run, "llm"))
        await writer.send(self._node_started(run, "end"))
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        await writer.send(self._node_finished(run, "end"))
        await writer.send(self._workflow_finished(run, "succeeded", self._workflow_outputs(run), None))
        return outcome

    def _text_chunk(self, run: _Run, token: str, selector: list[str] | None = None) -> dict[str, Any]:
        data = {"text": token, "from_variable_selector": selector or ["llm", "text"]}
        return self._chunk(run, "text_chunk", task_id=run.task_id, data=data)

    # --- human input (1.x) ----------------------------------------------------------------------------------

    def _open_form(self, run: _Run) -> FakeForm:
        node = run.app.human_input
        assert node is not None and run.workflow_run is not None
        form = FakeForm(node=node, run_id=run.workflow_run.id, app_key=run.app.api_key, query=run.query)
        self.forms[form.token or form.form_id] = form
        run.form = form
        run.workflow_run.status = "paused"
        run.workflow_run.forms.append(form)
        self._paused[run.workflow_run.id] = run
        self._runs_by_id[run.workflow_run.id] = run
        return form

    def _paused_event(self, run: _Run, form: FakeForm) -> dict[str, Any]:
        data = {"workflow_run_id": self._workflow_run_id(run), "paused_nodes": [form.node.node_id], "outputs": {},
                "reasons": [form.reason()], "status": "paused", "created_at": run.created_at,
                "elapsed_time": run.elapsed(), "total_tokens": 0, "total_steps": 2}  # fmt: skip
        return self._workflow_event(run, "workflow_paused", data)

    async def _pause_at_form(self, run: _Run, writer: _EventWriter) -> str:
        """60, 70: the node starts, asks for its form, the run pauses, and the stream closes."""
        assert run.app.human_input is not None
        await writer.send(self._node_started(run, run.app.human_input.node_id))
        form = self._open_form(run)
        await writer.send(self._workflow_event(run, "human_input_required", form.event_data()))
        await writer.send(self._paused_event(run, form))
        return _Outcome.PAUSED

    async def _resume(self, run: _Run, form: FakeForm) -> None:
        """The answered form resumes its run: the events go to whoever listens on the run's events route (62,
        66d, 72). The same task, message and conversation; the human node runs again with the answer."""
        await asyncio.sleep(0)  # after the submission's 200 went out, as Dify's queued resume task would
        wf = run.workflow_run
        assert wf is not None
        self._paused.pop(wf.id, None)
        wf.status = "running"
        run.resumed = True
        writer = _EventWriter(None, run.dialect, lambda obj: self._publish(wf.id, obj))
        node = form.node.node_id
        await writer.send(self._workflow_started(run, reason="resumption"))
        if run.app.mode == "workflow" and run.behaviour.resume_bug:
            # 1.16.1: the stop flag and abort command the pause left in Redis end the resumed run (62, 66b)
            record = ("stopped", form.workflow_outputs(), "Aborted: App task was stopped")
            await writer.send(self._workflow_finished(run, "stopped", {}, "Stopped by user.", record=record))
            return
        await writer.send(self._node_started(run, node))
        if run.app.mode == "advanced-chat":
            for text, selector in form.answer_pieces():
                await writer.send(self._message(run, text, selector))
                run.sent += text
                await self._pause(run, run.token_delay)
        else:
            outputs = form.workflow_outputs()
            pieces = [(str(value), [node if key != "query" else "start", key]) for key, value in outputs.items()]
            for position, (text, selector) in enumerate(pieces):
                if position:
                    await writer.send(self._text_chunk(run, "\n", ["end", "answer"]))
                await writer.send(self._text_chunk(run, text, selector))
                await self._pause(run, run.token_delay)
            run.sent = "\n".join(text for text, _ in pieces)
        await writer.send(self._node_finished(run, node, outputs=form.outputs()))
        if run.app.mode == "advanced-chat":
            await writer.send(self._node_started(run, "answer"))
            await writer.send(self._node_finished(run, "answer", outputs={"answer": run.sent, "files": []}))
            await writer.send(self._message_end(run))
            await writer.send(self._workflow_finished(run, "succeeded", {"answer": run.sent, "files": []}, None))
            self._finish_conversation(run)
        else:
            await writer.send(self._node_started(run, "end"))
            await writer.send(self._node_finished(run, "end", outputs=form.workflow_outputs()))
            await writer.send(self._workflow_finished(run, "succeeded", form.workflow_outputs(), None))

    async def _form_get(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        form = self._form_of(request, app)
        return app.dialect.form_body(form.definition())

    async def _form_submit(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        self._record(request, self._app_of(request), body)
        app = self._authenticate(request)
        user = self._require_user(body)
        inputs, action_id = body.get("inputs"), body.get("action")
        if not isinstance(inputs, dict) or not isinstance(action_id, str):
            raise DifyHTTPError(400, "invalid_param", "Invalid request: inputs (object) and action (string)")
        form = self._form_of(request, app)
        refusal = form.refusal(action_id, inputs)
        if refusal is not None:
            raise DifyHTTPError(400, "invalid_form_data", refusal)
        form.status, form.action_id, form.data, form.submitted_by = "submitted", action_id, dict(inputs), user
        self.form_submissions.append({"token": form.token, "action": action_id, "inputs": dict(inputs), "user": user})
        run = self._paused.get(form.run_id)
        if run is not None:
            task = asyncio.create_task(self._resume(run, form), name=f"fake-dify-resume-{form.run_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return app.dialect.restx_body({})

    def _form_of(self, request: web.Request, app: FakeApp) -> FakeForm:
        """The form a token names, if it is this app's and still open: else Dify's 404 or 412 (61b, 65b, 69b)."""
        if not app.dialect.is_1x:
            raise web.HTTPNotFound()
        form = self.forms.get(request.match_info["token"])
        if form is None or form.token is None or form.app_key != app.api_key:
            # flask-restx hints at the routes whose URLs look alike: for a real token only this one (61b, 61c)
            hint = "/v1/form/human_input/<string:form_token>"
            if form is None:
                hint += " or /api/form/human_input/<string:form_token>/upload-token"
            raise DifyHTTPError(404, "not_found", app.dialect.with_route_hint("Form not found", request.path, hint))
        if form.status == "submitted":
            message = f"This form has already been submitted by another user, form_id={form.form_id}"
            raise DifyHTTPError(412, "human_input_form_submitted", message)
        if form.expired:
            raise DifyHTTPError(412, "human_input_form_expired", f"This form has expired, form_id={form.form_id}")
        return form

    # --- the run events route (1.x) -------------------------------------------------------------------------

    def _publish(self, run_id: str, obj: dict[str, Any]) -> None:
        for subscription in self._subscribers.get(run_id, ()):
            subscription.queue.put_nowait(obj)

    async def _wait_subscriber(self, run_id: str, seconds: float) -> None:
        joined = self._joined.setdefault(run_id, asyncio.Event())
        if not self._subscribers.get(run_id):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await joined.wait()

    async def _run_events(self, request: web.Request) -> web.StreamResponse:
        app = self._app_of(request)
        self._record(request, app, None)
        app = self._authenticate(request)
        if not app.dialect.is_1x:
            raise web.HTTPNotFound()  # 0.x has no such route
        forced = self._behaviour_for(app).events_route_status
        if forced is not None:  # a proxy that does not pass the route on, or a Dify that refuses it
            code = "not_found" if forced == 404 else "bad_request"
            raise DifyHTTPError(forced, code, "The requested URL was not found on the server." if forced == 404
                                else "The browser (or proxy) sent a request that this server could not understand.")
        user = request.query.get("user")
        if not user:
            raise DifyHTTPError(400, "invalid_param", "Arg user must be provided.")  # 62d
        if app.mode not in WORKFLOW_MODES:
            raise DifyHTTPError(400, "not_workflow_app", _ROUTE_MISMATCH)
        record = self.workflow_runs.get(request.match_info["run_id"])
        if record is None or record.app != app.name or record.user != user:
            raise DifyHTTPError(404, "not_found", "Workflow run not found")  # 62b, 62c
        headers = app.dialect.stream_headers(events_route=True)
        if record.finished_at is not None:  # 66, 76: the run's end alone, in plain json.dumps, and close
            response = web.StreamResponse(headers=headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):
                await response.write(f"data: {json.dumps(self._finished_payload(app, record))}\n\n".encode())
                await response.write_eof()
            return response
        subscription = _Subscription(continue_on_pause=request.query.get("continue_on_pause") == "true")
        self._subscribers.setdefault(record.id, []).append(subscription)
        self._joined.setdefault(record.id, asyncio.Event()).set()
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await response.write(b"event: ping\n\n")
            run = self._runs_by_id.get(record.id)
            if request.query.get("include_state_snapshot") == "true" and run is not None:
                for obj in self._snapshot(run):
                    await response.write(app.dialect.chunk(obj))
                if record.status == "paused" and not subscription.continue_on_pause:
                    return response  # 60c, 70b: the snapshot ends with the pause, and so does the stream
            await self._relay(request, response, app, subscription)
        except ConnectionError:
            log.debug("fake Dify: an events route client went away")
        finally:
            self._subscribers[record.id].remove(subscription)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def _relay(
        self, request: web.Request, response: web.StreamResponse, app: FakeApp, subscription: _Subscription
    ) -> None:
        """The run's events as they happen, with a ping every interval, up to its end or pause."""
        while not self._closing.is_set():
            try:
                async with asyncio.timeout(self.ping_interval):
                    obj = await subscription.queue.get()
            except TimeoutError:
                await response.write(b"event: ping\n\n")
                continue
            await response.write(app.dialect.chunk(obj))
            ended = obj.get("event") in ("workflow_finished", "workflow_paused")
            if ended and not subscription.continue_on_pause:
                return
        # (continue_on_pause: the stream stays open with pings after the end, 67b, until the client leaves)

    def _finished_payload(self, app: FakeApp, record: WorkflowRun) -> dict[str, Any]:
        """WorkflowResponseConverter.workflow_run_result_to_finish_response: task_id is the run id (66, 76)."""
        return {"event": "workflow_finished", "task_id": record.id, "workflow_run_id": record.id, "data": {
            "id": record.id, "workflow_id": record.workflow_id, "status": record.status,
            "outputs": record.outputs if record.outputs is not None else {}, "error": record.error,
            "elapsed_time": record.elapsed_time, "total_tokens": record.total_tokens,
            "total_steps": record.total_steps,
            "created_by": {"id": self._end_user_id(app, record.user), "user": record.user},
            "created_at": record.created_at, "finished_at": record.finished_at, "exceptions_count": 0,
            "files": [],
        }}  # fmt: skip

    def _snapshot(self, run: _Run) -> list[dict[str, Any]]:
        """`include_state_snapshot=true`: the run so far from Dify's records (60c, 70b), in their key order."""
        wf = run.workflow_run
        assert wf is not None
        context = {}
        if run.app.mode == "advanced-chat":
            context = {"conversation_id": run.conversation_id, "message_id": run.message_id,
                       "created_at": run.created_at}  # fmt: skip
        head = {"task_id": run.task_id, "workflow_run_id": wf.id}
        inputs = _with_timestamp(wf) if run.app.mode == "workflow" else wf.inputs
        events = [{"event": "workflow_started", **head,
                   "data": {"id": wf.id, "workflow_id": wf.workflow_id, "inputs": inputs,
                            "created_at": wf.created_at, "reason": "initial"}} | context]  # fmt: skip
        if run.app.mode == "advanced-chat":
            events.append({"event": "message_replace", "task_id": run.task_id, "answer": "", "reason": ""} | context)
        paused_node = run.form.node.node_id if run.form is not None and wf.status == "paused" else None
        for entry in run.node_log:
            node = self._node(run, entry["node_id"])
            started = {**node, "inputs": None, "created_at": entry["created_at"], "extras": {},
                       "iteration_id": None, "loop_id": None}  # fmt: skip
            events.append({"event": "node_started", **head, "data": started} | context)
            status = "paused" if entry["node_id"] == paused_node else entry["status"]
            if status == "running":
                continue
            finished = {**node, "inputs": None, "process_data": None, "outputs": None, "status": status,
                        "error": None, "elapsed_time": 0.0, "execution_metadata": None,
                        "created_at": entry["created_at"], "finished_at": entry["finished_at"], "files": [],
                        "iteration_id": None, "loop_id": None}  # fmt: skip
            events.append({"event": "node_finished", **head, "data": finished} | context)
        if paused_node is not None and run.form is not None:
            events.append({"event": "human_input_required", **head, "data": run.form.event_data()} | context)
            paused = self._paused_event(run, run.form)
            events.append({"event": "workflow_paused", **head, "data": paused["data"]} | context)
        return events

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
            # 0.15.x reports a switched-off feature like this; 1.x says what it is (48)
            message = "Suggested Questions Is Disabled." if app.dialect.is_1x else "Message Not Exists."
            raise DifyHTTPError(400, "bad_request", message)
        questions, delay = self._suggested[app.api_key]
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        return app.dialect.restx_body({"result": "success", "data": questions})

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
_PAYLOAD_MODELS = {  # 1.x's pydantic models of the generation routes (the chat one is recorded, 31)
    "chat": "ChatRequestPayload",
    "completion": "CompletionRequestPayload",
    "workflow": "WorkflowRunPayload",
}
_WORKFLOW_MISMATCH = "Please check if your Workflow app mode matches the right API route."


def _with_timestamp(record: WorkflowRun) -> dict[str, Any]:
    """A run's inputs as 1.x stores them: `sys.timestamp` after `sys.app_id` (84, 60c)."""
    inputs: dict[str, Any] = {}
    for name, value in record.inputs.items():
        inputs[name] = value
        if name == "sys.app_id":
            inputs["sys.timestamp"] = record.created_at
    return inputs


def _not_workflow_app(dialect: Dialect) -> DifyHTTPError:
    """0.15.3 names the Workflow app in the message; 1.16.1 says what it says for chat apps (88b)."""
    return DifyHTTPError(400, "not_workflow_app", _ROUTE_MISMATCH if dialect.is_1x else _WORKFLOW_MISMATCH)
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
