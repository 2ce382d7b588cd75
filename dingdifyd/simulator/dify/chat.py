"""Chat, agent and completion apps: what their streams send (message or agent_message events, agent thoughts,
message_end), deleting a conversation, and the suggested questions after an answer (docs/dify.md#chat-apps)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.errors import ROUTE_MISMATCH, DifyHTTPError
from dingdifyd.simulator.dify.model import CHAT_MODES, Run
from dingdifyd.simulator.dify.sse import EventWriter
from dingdifyd.simulator.dify.streaming import AnswerStream, Outcome


class ChatApps(AnswerStream):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self._suggested: dict[str, tuple[list[str], float]] = {}  # api key -> (questions, delay)

    def _chat_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/messages/{message_id}/suggested", self._suggested_questions),
            web.delete("/v1/conversations/{conversation_id}", self._delete_conversation),
        ]

    def enable_suggested_questions(self, api_key: str, questions: list[str], *, delay: float = 0.0) -> None:
        """Switch the app's "suggested questions after answer" on: /parameters says so, and
        `GET /messages/:id/suggested` answers `questions` after `delay` seconds."""
        self._suggested[api_key] = (list(questions), delay)

    async def _emit_chat(self, run: Run, writer: EventWriter) -> str:
        """chat and completion apps: message×N, message_end."""
        await self._emit_steps(run, writer)
        outcome = await self._stream_tokens(run, writer, lambda token: self._message(run, token))
        if outcome == Outcome.ERROR:
            await writer.send(self._upstream_error(run))
        if outcome not in (Outcome.DONE, Outcome.STOPPED):
            return outcome
        if run.behaviour.message_file:
            await writer.send(self._message_file(run))
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        usage = self._stopped_usage(run) if outcome == Outcome.STOPPED else None
        await writer.send(self._message_end(run, usage=usage))
        return outcome

    def _thought(self, run: Run, thought_id: str, position: int, **fields: Any) -> dict[str, Any]:
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

    async def _emit_agent(self, run: Run, writer: EventWriter) -> str:
        """agent_thought, [tool call: thoughts, message_file], agent_message×N, agent_thought, message_end."""
        position = 1
        thought_id = str(uuid.uuid4())
        if run.fails_upstream and run.dialect.is_1x:  # 124: the model fails before the first thought
            await writer.send(self._upstream_error(run))
            return Outcome.ERROR
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
        if outcome == Outcome.ERROR:
            await writer.send(self._upstream_error(run))
        if outcome not in (Outcome.DONE, Outcome.STOPPED):
            return outcome
        await writer.send(self._thought(run, thought_id, position, thought=run.sent))
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        usage = self._stopped_usage(run) if outcome == Outcome.STOPPED else None
        await writer.send(self._message_end(run, usage=usage))
        return outcome

    async def _delete_conversation(self, request: web.Request) -> web.Response:
        body = await self._read_json(request)
        self._record(request, self._app_of(request), body)
        app = self._authenticate(request)
        user = self._require_user(body)
        if app.mode not in CHAT_MODES:
            raise DifyHTTPError(400, "not_chat_app", ROUTE_MISMATCH)
        conversation = self.conversations.get(request.match_info["conversation_id"])
        if conversation is None or conversation.app != app.name or conversation.user != user:
            message = "Conversation Not Exists."
            raise DifyHTTPError(404, "not_found", message)
        del self.conversations[conversation.id]
        return app.dialect.no_content()

    async def _suggested_questions(self, request: web.Request) -> web.Response:
        app = self._app_of(request)
        self._record(request, app, None)
        app = self._authenticate(request)
        if not request.query.get("user"):
            raise DifyHTTPError(400, "invalid_param", "Arg user must be provided.")
        if app.mode not in CHAT_MODES:
            raise DifyHTTPError(400, "not_chat_app", ROUTE_MISMATCH)
        if app.api_key not in self._suggested:
            # 0.15.x reports a switched-off feature like this; 1.x says what it is (48)
            message = "Suggested Questions Is Disabled." if app.dialect.is_1x else "Message Not Exists."
            raise DifyHTTPError(400, "bad_request", message)
        questions, delay = self._suggested[app.api_key]
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        return app.dialect.restx_body({"result": "success", "data": questions})
