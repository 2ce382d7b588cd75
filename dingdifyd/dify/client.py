"""The Dify Service API client: one app (one API key), streaming answers as typed events.

Every byte goes through `_request` (connect, send, response headers, error statuses) and `_io` (each
read after that), which turn aiohttp, OS and timeout failures into the DifyError family, so nothing above
this module sees aiohttp. Three timeouts, each for one way a peer can hang: the TCP connect, the wait for
the response headers (Dify sends them once the app has started), and the gap between two reads of the
stream (Dify pings every 10 s, so a silent minute means a dead stream). The stream ends at the terminal
event, not at EOF: Dify keeps the socket open after `message_end` while it generates a conversation title.

Dify 1.x adds what a paused or cut run needs: the run's event stream (`GET /workflow/:run_id/events`, ≥ 1.14;
following it is dify/following.py's) and the human-input form routes (`GET`/`POST /form/human_input/:token`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urljoin

import aiohttp

from dingdifyd.apptypes import APP_TYPE_BY_MODE, AUTO, CHAT_APP_TYPES, CONFIGURABLE_APP_TYPES, UNSUPPORTED_MODES
from dingdifyd.config import DifyTimeouts, Secret
from dingdifyd.dify.events import DifyEvent, MessageEnd, WorkflowFinished, WorkflowPaused, parse_event
from dingdifyd.dify.sse import SSEMessage, iter_sse
from dingdifyd.errors import (
    ConversationNotFound,
    DifyAuthError,
    DifyError,
    DifyRateLimited,
    DifyStreamCut,
    DifyTimeout,
    DifyTotalTimeout,
    DifyUnavailable,
    UnsupportedAppMode,
)
from dingdifyd.origins import origin_of, origins_of

log = logging.getLogger(__name__)

DEFAULT_TIMEOUTS = DifyTimeouts()  # the table's defaults (config/settings.py)
FINISHED_STATUSES = ("succeeded", "partial-succeeded")
RUN_EVENTS_SINCE = (1, 14)  # the Dify version that serves GET /workflow/:run_id/events
_RATE_LIMIT_CODES = ("too_many_requests", "rate_limit_error")
MAX_FILE_REDIRECTS = 3
_ROUTE_MISMATCH_CODES = ("not_chat_app", "not_completion_app", "not_workflow_app", "app_unavailable")


def classify_error(status: int | None, code: str | None, message: str) -> DifyError:
    """The DifyError subclass for an error Dify reported, before the stream (HTTP status) or inside it."""
    if status in (401, 403):
        return DifyAuthError(message, status=status, code=code)
    # 1.x appends route hints to this message ("... You have requested this URI ..."): never compare equal
    if code == "not_found" and message.startswith("Conversation Not Exists"):
        return ConversationNotFound(message, status=status, code=code)
    # in 1.x the concurrency limit may surface as a 400 whose code still says what it is
    if status == 429 or code in _RATE_LIMIT_CODES:
        return DifyRateLimited(message, status=status, code=code)
    return DifyError(message, status=status, code=code)


def error_from_response(status: int, body: bytes, content_type: str) -> DifyError:
    """The error for a non-2xx answer: Dify's `{"code", "message", "status"}`, or whatever a proxy sent."""
    try:
        obj = json.loads(body.decode("utf-8", errors="replace")) if body else None
    except ValueError:
        obj = None
    if isinstance(obj, dict) and ("code" in obj or "message" in obj):
        code = str(obj.get("code") or "") or None
        message = str(obj.get("message") or f"HTTP {status}")
        if obj.get("params"):  # flask-restful validation errors name the offending field here
            message = f"{message}: {obj['params']}"
        return classify_error(status, code, message)
    kind = content_type or "no content type"
    return classify_error(status, None, f"Dify answered HTTP {status} with a non-JSON body ({kind})")


def ends_answer_stream(event: DifyEvent, app_type: str) -> bool:
    """Whether `event` is the last of an answer's stream: `message_end`, a workflow app's `workflow_finished`,
    a chatflow's unsuccessful `workflow_finished` (1.x sends no `message_end` after a stop), or a pause."""
    if isinstance(event, MessageEnd | WorkflowPaused):
        return True
    if isinstance(event, WorkflowFinished):
        return app_type == "workflow" or event.status not in FINISHED_STATUSES
    return False


def ends_run_stream(event: DifyEvent) -> bool:
    """The events route closes after the run finishes or pauses; a chatflow's `message_end` comes before."""
    return isinstance(event, WorkflowFinished | WorkflowPaused)


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """`1.16.1` -> (1, 16, 1); None when there is no version to read."""
    parts = []
    for piece in (text or "").strip().split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts) or None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class DifyClient:
    """One Dify app. Uses the aiohttp session it is given and never closes it."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: Secret,
        app_type: str,
        session: aiohttp.ClientSession,
        timeouts: DifyTimeouts = DEFAULT_TIMEOUTS,
        input_variable: str | None = "query",
        files_url: str | None = None,
    ):
        if app_type not in CONFIGURABLE_APP_TYPES:
            raise ValueError(f"app_type must be one of {', '.join(CONFIGURABLE_APP_TYPES)}, not {app_type!r}")
        self.base_url = base_url.rstrip("/")
        # where Dify serves its files: its own origin, and its FILES_URL host when that is another one.
        # Nothing else is ever fetched, and no redirect leads elsewhere (a model writes the URLs).
        self.file_origins = origins_of([self.base_url, files_url])
        self.app_type = app_type
        self.input_variable = input_variable or "query"  # the bridge may set the app's own (GET /parameters)
        self.timeouts = timeouts
        self.server_version: str | None = None  # X-Version of Dify's last answer (1.x and 0.15 both send it)
        self._api_key = api_key
        self._session = session

    @property
    def serves_run_events(self) -> bool:
        """False only when Dify said it is older than the events route; unknown versions are asked (a 404 then
        tells, see dify/guarded.py)."""
        version = parse_version(self.server_version)
        return version is None or version[:2] >= RUN_EVENTS_SINCE

    def __repr__(self) -> str:
        return f"DifyClient({self.base_url!r}, app_type={self.app_type!r})"

    # --- public calls -------------------------------------------------------------------------------------

    async def stream_answer(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str | None = None,
        inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> AsyncGenerator[DifyEvent, None]:
        """Ask the app and yield its events up to and including the terminal one (pings are not yielded).

        Raises DifyError (or a subclass) for an HTTP error, an `error` event, a failed workflow, a timeout,
        or a stream that ends without its terminal event.
        """
        if self.app_type == AUTO:
            self.app_type = await self.resolve_app_type()
        path, body = self.request_for(
            query=query, user=user, conversation_id=conversation_id, inputs=inputs, files=files
        )
        app_type = self.app_type
        log.debug("POST %s (user %s, conversation %s)", path, user, conversation_id or "new")
        deadline = asyncio.get_running_loop().time() + self.timeouts.total
        async with self._request("POST", path, json_body=body, deadline=deadline) as response:
            async for event in self._events(path, response, deadline, lambda e: ends_answer_stream(e, app_type)):
                yield event

    async def run_events(
        self,
        run_id: str,
        user: str,
        *,
        snapshot: bool = False,
        deadline: float | None = None,
        subscribed: asyncio.Event | None = None,
    ) -> AsyncGenerator[DifyEvent, None]:
        """`GET /workflow/:run_id/events` (Dify ≥ 1.14, workflow and chatflow apps): the run's events from now
        on, up to and including `workflow_finished` or `workflow_paused`; with `snapshot`, the run so far first
        (replayed from Dify's records). A finished run gives its `workflow_finished` alone. Events are published,
        not buffered: what happened before the request is only in the snapshot.

        Raises DifyError like stream_answer; 404 for a run of another user or app, and on servers without the
        route (0.x). `subscribed` is set once Dify listens (its response headers are in)."""
        path = f"/workflow/{quote(run_id, safe='')}/events?user={quote(user, safe='')}"
        if snapshot:
            path += "&include_state_snapshot=true"
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.timeouts.total
        on_headers = subscribed.set if subscribed is not None else None
        async with self._request("GET", path, deadline=deadline, on_headers=on_headers) as response:
            async for event in self._events(path.split("?")[0], response, deadline, ends_run_stream):
                yield event

    @contextlib.asynccontextmanager
    async def subscribed_run_events(
        self, run_id: str, user: str, *, deadline: float | None = None
    ) -> AsyncIterator[AsyncIterator[DifyEvent]]:
        """The run's events, subscribed before the body returns: Dify sends the response headers (and a ping)
        once it listens, so whatever is done inside (submitting a form) cannot resume the run unseen."""
        subscribed = asyncio.Event()
        events = self.run_events(run_id, user, deadline=deadline, subscribed=subscribed)
        first: asyncio.Task[DifyEvent] | None = None
        try:
            # the request is made as soon as the generator runs; its headers arrive once Dify subscribed
            first = asyncio.ensure_future(anext(events))
            await _wait_subscribed(first, subscribed)
            yield _prepended(first, events)
        finally:
            if first is not None and not first.done():
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
            await events.aclose()

    async def _events(
        self,
        path: str,
        response: aiohttp.ClientResponse,
        deadline: float,
        is_terminal: Callable[[DifyEvent], bool],
    ) -> AsyncGenerator[DifyEvent, None]:
        """The typed events of an SSE response up to the terminal one; DifyStreamCut when it ends before."""
        content_type = response.headers.get("Content-Type", "")
        if not content_type.startswith("text/event-stream"):
            raise DifyError(
                f"Dify answered {path} with {content_type or 'no content type'}, not an event stream",
                status=response.status,
            )
        async with (
            contextlib.aclosing(self._chunks(response, deadline)) as chunks,
            contextlib.aclosing(iter_sse(chunks)) as messages,
        ):
            async for message in messages:
                event = self._decode(message)
                if event is None:
                    continue
                if is_terminal(event):
                    # do not wait for EOF: Dify may hold the socket open long after the terminal event
                    response.close()
                    log.debug("stream %s of task %s complete (%s)", path, event.task_id, event.event)
                    yield event
                    return
                yield event
        raise DifyStreamCut(f"the Dify stream of {path} ended before the run ended")

    async def form(self, token: str) -> dict[str, Any]:
        """`GET /form/human_input/:token`: the form with its inputs resolved. 404 unknown (or another app's),
        412 `human_input_form_submitted` / `human_input_form_expired`."""
        return await self._json_call("GET", f"/form/human_input/{quote(token, safe='')}")

    async def submit_form(self, token: str, *, action: str, inputs: dict[str, Any], user: str) -> None:
        """`POST /form/human_input/:token`: answer the form with one of its actions; the run then resumes.
        400 `invalid_form_data` (unknown action, missing input), 404, 412 as for `form`."""
        body = {"inputs": inputs, "action": action, "user": user}
        await self._json_call("POST", f"/form/human_input/{quote(token, safe='')}", json_body=body)

    async def stop(self, task_id: str, user: str) -> None:
        """Ask Dify to stop a running generation; its stream then ends early with its terminal event."""
        if self.app_type == AUTO:
            self.app_type = await self.resolve_app_type()
        if self.app_type == "workflow":
            path = f"/workflows/tasks/{task_id}/stop"
        elif self.app_type == "completion":
            path = f"/completion-messages/{task_id}/stop"
        else:
            path = f"/chat-messages/{task_id}/stop"
        await self._json_call("POST", path, json_body={"user": user})

    async def workflow_run(self, run_id: str) -> dict[str, Any]:
        """`GET /workflows/run/:id`: the run's `status` and `outputs` (a JSON string in 0.x, an object in 1.x)."""
        return await self._json_call("GET", f"/workflows/run/{run_id}")

    async def resolve_app_type(self) -> str:
        """The app's type, for `app_type: auto`. Dify 1.x names its mode in `GET /info`; older servers do not,
        so ask the two generation endpoints with a body that fails validation before anything runs: a key
        of another kind of app is refused by the route check first (`not_chat_app`, `app_unavailable`).
        The three chat kinds are the same to this client, so an old server's chat app is a "chatbot"."""
        mode = (await self.info()).get("mode")
        if mode in UNSUPPORTED_MODES:
            raise UnsupportedAppMode(str(mode))
        if mode in APP_TYPE_BY_MODE:
            app_type = APP_TYPE_BY_MODE[mode]
        elif await self._route_accepts("/chat-messages"):
            app_type = "chatbot"
        elif await self._route_accepts("/completion-messages"):
            app_type = "completion"
        else:
            app_type = "workflow"
        log.info("Dify app type: %s (mode %s)", app_type, mode or "not reported")
        return app_type

    async def _route_accepts(self, path: str) -> bool:
        # no `inputs`: every Dify version refuses this after its route check (invalid_param), so nothing runs
        try:
            await self._json_call("POST", path, json_body={"user": "dingdifyd-probe"})
        except DifyError as exc:
            if exc.status == 400:
                return exc.code not in _ROUTE_MISMATCH_CODES
            raise
        return True

    async def info(self) -> dict[str, Any]:
        """`GET /info`: name, description, tags; late 1.x adds `mode`."""
        return await self._json_call("GET", "/info")

    async def parameters(self) -> dict[str, Any]:
        """`GET /parameters`: the app's input form (`user_input_form`), file upload settings, ..."""
        return await self._json_call("GET", "/parameters")

    async def suggested_questions(self, message_id: str, user: str) -> list[str]:
        """`GET /messages/:id/suggested`: follow-up questions for an answer (400 when the app has them off)."""
        path = f"/messages/{quote(message_id, safe='')}/suggested?user={quote(user, safe='')}"
        data = (await self._json_call("GET", path)).get("data")
        return [str(item) for item in data if isinstance(item, str) and item.strip()] if isinstance(data, list) else []

    async def version(self) -> dict[str, Any]:
        """`GET /` (needs no key): `{"welcome", "api_version", "server_version"}`."""
        return await self._json_call("GET", "/")

    async def upload_file(self, *, data: bytes, filename: str, mime_type: str, user: str) -> dict[str, Any]:
        """`POST /files/upload`; the returned `id` goes into a `files` entry as `upload_file_id`."""
        # unquoted: Dify (werkzeug) reads a UTF-8 filename as is, and would keep a %-encoded one encoded
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("user", user)
        form.add_field("file", data, filename=filename.replace('"', "'"), content_type=mime_type)
        return await self._json_call("POST", "/files/upload", form=form)

    async def resolved_app_type(self) -> str:
        """The app's type, asking Dify once when configured as `auto`."""
        if self.app_type == AUTO:
            self.app_type = await self.resolve_app_type()
        return self.app_type

    async def fetch_file(self, url: str, *, max_bytes: int = 20 * 1024 * 1024) -> tuple[bytes, str]:
        """A file Dify serves at an absolute URL (a signed `/files/...` link): its bytes and content type.

        No API key is sent: the signature is the credential. Only URLs on `file_origins` are fetched, and
        redirects are followed only within them (at most MAX_FILE_REDIRECTS)."""
        what = "GET a Dify file"
        if origin_of(url) not in self.file_origins:
            raise DifyError(f"{what}: not on Dify's origin", code="origin_refused")
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeouts.connect, sock_read=None
        )
        chunks: list[bytes] = []
        size = 0
        async with self._io(what, self.timeouts.first_byte, waiting_for="file"):
            for _ in range(MAX_FILE_REDIRECTS + 1):
                async with self._session.get(
                    url, timeout=timeout, raise_for_status=False, allow_redirects=False
                ) as response:
                    if response.status in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        if origin_of(url) not in self.file_origins:
                            raise DifyError(f"{what}: a redirect to another origin refused", code="redirect_refused")
                        continue
                    if response.status != 200:
                        raise DifyError(f"{what}: HTTP {response.status}", status=response.status)
                    if (response.content_length or 0) > max_bytes:
                        raise DifyError(f"{what}: larger than {max_bytes} bytes", code="file_too_large")
                    content_type = response.headers.get("Content-Type", "")
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > max_bytes:
                            raise DifyError(f"{what}: larger than {max_bytes} bytes", code="file_too_large")
                    return b"".join(chunks), content_type
        raise DifyError(f"{what}: more than {MAX_FILE_REDIRECTS} redirects", code="redirect_refused")

    # --- pure request building ----------------------------------------------------------------------------

    def request_for(
        self,
        *,
        query: str,
        user: str,
        conversation_id: str | None = None,
        inputs: dict[str, Any] | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of the streaming request for this app type."""
        if self.app_type == AUTO:
            raise ValueError("the app type is not known yet: call resolve_app_type() first")
        inputs = dict(inputs or {})
        body: dict[str, Any]
        if self.app_type in CHAT_APP_TYPES:
            path = "/chat-messages"
            body = {"inputs": inputs, "query": query, "response_mode": "streaming", "user": user}
            if conversation_id:
                body["conversation_id"] = conversation_id
            # no title generation: it costs an LLM call and keeps the stream open after message_end
            body["auto_generate_name"] = False
        else:
            inputs[self.input_variable] = query
            path = "/completion-messages" if self.app_type == "completion" else "/workflows/run"
            body = {"inputs": inputs}
            if self.app_type == "completion":
                body["query"] = query
            body.update({"response_mode": "streaming", "user": user})
        if files:
            body["files"] = files
        return path, body

    # --- I/O ----------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        form: aiohttp.FormData | None = None,
        deadline: float | None = None,
        on_headers: Callable[[], None] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request; give its response once the headers are in and the status is 2xx; close it after."""
        headers = {"Authorization": f"Bearer {self._api_key.reveal()}"}
        data: Any = None
        if form is not None:
            data = form  # aiohttp sets the multipart Content-Type with its boundary
        elif method != "GET":
            # always JSON with its Content-Type, even for an empty body: newer werkzeug answers 415 otherwise
            headers["Content-Type"] = "application/json"
            data = json.dumps(json_body if json_body is not None else {})
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeouts.connect, sock_read=None
        )
        async with self._io(
            f"{method} {path}", self.timeouts.first_byte, waiting_for="response headers", deadline=deadline
        ):
            response = await self._session.request(
                method,
                self.base_url + path,
                data=data,
                headers=headers,
                timeout=timeout,
                raise_for_status=False,
                allow_redirects=False,
            )
        self.server_version = response.headers.get("X-Version") or self.server_version
        try:
            if not 200 <= response.status < 300:
                async with self._io(f"{method} {path}", self.timeouts.first_byte, waiting_for="the error body"):
                    body = await response.read()
                error = error_from_response(response.status, body, response.headers.get("Content-Type", ""))
                log.debug("%s %s: HTTP %d %s", method, path, response.status, error.code)
                raise error
            if on_headers is not None:
                on_headers()
            yield response
        finally:
            response.close()

    @contextlib.asynccontextmanager
    async def _io(
        self, what: str, seconds: float, *, waiting_for: str, deadline: float | None = None
    ) -> AsyncIterator[None]:
        """Bound one wait by `seconds`, and by `deadline` (loop time) when the whole answer has one, and
        translate every transport failure inside it."""
        remaining = seconds if deadline is None else deadline - asyncio.get_running_loop().time()
        total_bound = remaining < seconds
        try:
            async with asyncio.timeout(max(min(seconds, remaining), 0.0)):
                yield
        except aiohttp.ConnectionTimeoutError as exc:
            raise DifyUnavailable(f"{what}: connecting to Dify timed out after {self.timeouts.connect:g} s") from exc
        except TimeoutError as exc:
            if total_bound:
                raise DifyTotalTimeout(
                    f"{what}: the answer took longer than {self.timeouts.total:g} s in total"
                ) from exc
            raise DifyTimeout(f"{what}: no {waiting_for} from Dify within {seconds:g} s") from exc
        except aiohttp.ClientPayloadError as exc:
            raise DifyStreamCut(f"{what}: the response was cut off ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise DifyUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def _json_call(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        form: aiohttp.FormData | None = None,
    ) -> dict[str, Any]:
        what = f"{method} {path}"
        async with (
            self._request(method, path, json_body=json_body, form=form) as response,
            self._io(what, self.timeouts.first_byte, waiting_for="response body"),
        ):
            body = await response.read()
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise DifyError(f"{method} {path}: Dify answered HTTP {response.status} with no JSON object")
        return obj

    async def _chunks(
        self, response: aiohttp.ClientResponse, deadline: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; each read may wait at most the idle timeout (and never past `deadline`)."""
        reader = response.content.iter_any().__aiter__()
        while True:
            async with self._io("reading the Dify stream", self.timeouts.idle, waiting_for="data", deadline=deadline):
                try:
                    chunk = await reader.__anext__()
                except StopAsyncIteration:
                    return
            yield chunk

    # --- event decoding -----------------------------------------------------------------------------------

    def _decode(self, message: SSEMessage) -> DifyEvent | None:
        """The typed event of one SSE message; raises for `error` events and failed workflows."""
        try:
            obj = json.loads(message.data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            log.warning("skipping a Dify stream event whose data is not a JSON object (%d chars)", len(message.data))
            log.debug("malformed event data: %r", message.data[:200])
            return None
        if obj.get("event") == "error":
            status = _int_or_none(obj.get("status"))
            code = str(obj.get("code") or "") or None
            raise classify_error(status, code, str(obj.get("message") or "Dify reported an error in the stream"))
        event = parse_event(obj)
        if isinstance(event, WorkflowFinished) and event.status == "failed":
            raise DifyError(event.error or "the workflow run failed", code="workflow_failed")
        return event


async def _wait_subscribed(first: asyncio.Future[DifyEvent], subscribed: asyncio.Event) -> None:
    """Until the events request's headers are in; its error (404, 400, refused...) when it fails before."""
    waiter = asyncio.ensure_future(subscribed.wait())
    either: set[asyncio.Future[Any]] = {first, waiter}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if first.done() and not subscribed.is_set():
        first.result()  # raises the request's error
        raise DifyStreamCut("the Dify event stream ended before it began")


async def _prepended(
    first: asyncio.Future[DifyEvent], rest: AsyncIterator[DifyEvent]
) -> AsyncGenerator[DifyEvent, None]:
    """`first`'s event, then the rest of the stream (the stream ending right away is `first` raising)."""
    try:
        yield await first
    except StopAsyncIteration:
        return
    async for event in rest:
        yield event
