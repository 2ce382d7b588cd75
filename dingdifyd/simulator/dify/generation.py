"""The generation routes (`POST /chat-messages`, `/completion-messages`, `/workflows/run`) and their stop
routes: the request checked as each version checks it, then answered blocking or streaming by the app's kind
(docs/dify.md#generation)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.chat import ChatApps
from dingdifyd.simulator.dify.core import PAYLOAD_MODEL_KEY
from dingdifyd.simulator.dify.dialect import ValidationFailure
from dingdifyd.simulator.dify.errors import (
    APP_UNAVAILABLE,
    INTERNAL_SERVER_ERROR,
    ROUTE_MISMATCH,
    DifyHTTPError,
    invalid_param,
    not_workflow_app,
)
from dingdifyd.simulator.dify.model import (
    CHAT_MODES,
    ONLY_INFO_MODES,
    UPSTREAM_FAILURES,
    WORKFLOW_MODES,
    Behaviour,
    Conversation,
    FakeApp,
    Run,
    StopRecord,
    WorkflowRun,
    is_uuid,
    split_tokens,
)
from dingdifyd.simulator.dify.streaming import Outcome
from dingdifyd.simulator.dify.workflow import WorkflowApps

log = logging.getLogger(__name__)

_PAYLOAD_MODELS = {  # 1.x's pydantic models of the generation routes (the chat one is recorded, 31)
    "chat": "ChatRequestPayload",
    "completion": "CompletionRequestPayload",
    "workflow": "WorkflowRunPayload",
}


class Generation(ChatApps, WorkflowApps):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self.stops: list[StopRecord] = []
        self.generations_in_flight = 0
        self.max_generations_in_flight = 0  # the most answers streaming at the same time

    def _generation_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat-messages", self._chat_messages),
            web.post("/v1/completion-messages", self._completion_messages),
            web.post("/v1/workflows/run", self._workflows_run),
            web.post("/v1/chat-messages/{task_id}/stop", self._stop_chat),
            web.post("/v1/completion-messages/{task_id}/stop", self._stop_completion),
            web.post("/v1/workflows/tasks/{task_id}/stop", self._stop_workflow),
        ]

    async def _chat_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completion_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _workflows_run(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "workflow")

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        """One generation request: refused in the order Dify checks (key, body, user, route, arguments, the
        concurrency limit, inputs, files; the recordings show which refusal wins), else run blocking or
        streaming. One function, so that the order reads top to bottom."""
        body = await self._read_json(request)
        self._record(request, self._app_of(request), body)
        app = self._authenticate(request)
        if body is None:
            message = "The browser (or proxy) sent a request that this server could not understand."
            raise DifyHTTPError(400, "bad_request", message)
        user = self._require_user(body)
        if app.mode in ONLY_INFO_MODES:  # a 1.x channel or rag-pipeline app: no generation route takes its key
            raise DifyHTTPError(400, "app_unavailable", APP_UNAVAILABLE)
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
            raise invalid_param("query is required")
        self._consume_next_request(app)  # only a request that got this far uses up a one-shot override
        if behaviour.http_500:
            raise DifyHTTPError(500, "internal_server_error", INTERNAL_SERVER_ERROR)

        if app.mode in CHAT_MODES and conversation is None:
            conversation = Conversation(id=str(uuid.uuid4()), app=app.name, user=user)
            self.conversations[conversation.id] = conversation
        text_query = query if app.mode in CHAT_MODES else self._text_input(app, inputs) or query
        slow = "slow" in text_query.lower()
        run = Run(
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
            raise DifyHTTPError(400, "not_chat_app", ROUTE_MISMATCH)
        if endpoint == "completion" and app.mode != "completion":
            raise DifyHTTPError(400, "app_unavailable", APP_UNAVAILABLE)
        if endpoint == "workflow" and app.mode != "workflow":
            raise not_workflow_app(app.dialect)

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
        if endpoint == "chat" and conversation_id and not is_uuid(str(conversation_id)):
            raise ValidationFailure("conversation_id", "not_uuid", value=conversation_id)
        return query or "", mode == "streaming", str(conversation_id)

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
                        raise invalid_param(f"{name} is required in input form")
                    cleaned[name] = None if kind == "file" else spec.get("default") or None
                    continue
                if kind in ("text-input", "paragraph", "select") and not isinstance(value, str):
                    raise invalid_param(f"{name} in input form must be a string")
                if kind == "select" and value not in spec.get("options", []):
                    raise invalid_param(f"{name} in input form must be one of the following: {spec.get('options')}")
                max_length = spec.get("max_length")
                if isinstance(value, str) and max_length and len(value) > max_length:
                    raise invalid_param(f"{name} in input form must be less than {max_length} characters")
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
            raise invalid_param("files must be a list")
        for item in files:
            if not isinstance(item, dict):
                raise invalid_param("Invalid upload file")
            method = item.get("transfer_method")
            if method == "local_file" and item.get("upload_file_id") not in self.uploads:
                raise invalid_param("Invalid upload file")
            if method == "remote_url" and not item.get("url"):
                raise invalid_param("Missing file url")
            if method not in ("local_file", "remote_url"):
                raise invalid_param("Invalid transfer method")
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

    def _blocking(self, run: Run) -> web.Response:
        dialect = run.dialect
        failure = UPSTREAM_FAILURES[run.app.version]
        if run.fails_upstream and not (dialect.is_1x and run.app.mode == "workflow"):
            if dialect.is_1x and run.app.mode == "advanced-chat":
                raise DifyHTTPError(400, "invalid_param", f"Run failed: {failure}")  # 105b
            raise DifyHTTPError(400, "completion_request_error", failure)
        if run.app.human_input is not None:
            return self._blocking_pause(run)
        outputs: dict[str, Any] | None = None
        status, error = "succeeded", None
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

    async def _stream(self, request: web.Request, run: Run) -> web.StreamResponse:
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
            if outcome in (Outcome.DONE, Outcome.STOPPED) and writer.lost is not None:
                self._finish_conversation(run)  # 1.x: the run went on without its client, and ended
            if outcome == Outcome.STALL or writer.lost == "stall":
                await self._linger(request, None)
            elif outcome == Outcome.CUT or writer.lost in ("cut", "end", "gone"):
                if request.transport is not None and writer.lost != "end":
                    request.transport.close()
                return response
            elif outcome in (Outcome.DONE, Outcome.STOPPED) and run.behaviour.hold_open_after_end > 0:
                await self._linger(request, run.behaviour.hold_open_after_end)
            if outcome in (Outcome.DONE, Outcome.STOPPED) and writer.lost is None:
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

    async def _stop_chat(self, request: web.Request) -> web.Response:
        return await self._stop(request, CHAT_MODES, DifyHTTPError(400, "not_chat_app", ROUTE_MISMATCH))

    async def _stop_completion(self, request: web.Request) -> web.Response:
        return await self._stop(request, ("completion",), DifyHTTPError(400, "app_unavailable", APP_UNAVAILABLE))

    async def _stop_workflow(self, request: web.Request) -> web.Response:
        return await self._stop(request, ("workflow",), not_workflow_app(self._dialect_of(request)))

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
