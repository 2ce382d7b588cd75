"""Chatflow and workflow apps: how a run goes (its events in each version's order, failures, stops, a pause at
a Human Input node), and `GET /workflows/run/:id`, the run record (docs/dify.md#workflow-apps)."""

from __future__ import annotations

import email.utils
import json
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.errors import DifyHTTPError, not_workflow_app
from dingdifyd.simulator.dify.human_input import HumanInput
from dingdifyd.simulator.dify.model import STOPPED_BY_USER, UPSTREAM_FAILURES, Run, split_tokens, with_timestamp
from dingdifyd.simulator.dify.sse import EventWriter
from dingdifyd.simulator.dify.streaming import Outcome


class WorkflowApps(HumanInput):
    def _workflow_routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/workflows/run/{run_id}", self._workflow_run_detail)]

    async def _workflow_prelude(self, run: Run, writer: EventWriter) -> None:
        await writer.send(self._workflow_started(run))
        await writer.send(self._node_started(run, "start"))
        await writer.send(self._node_finished(run, "start"))
        if run.app.human_input is None:
            await writer.send(self._node_started(run, "llm"))

    async def _emit_chatflow(self, run: Run, writer: EventWriter) -> str:
        """workflow_started, nodes, message×N, nodes, then message_end and workflow_finished (0.15.3: the other
        way round); a 1.x human input node pauses the run instead."""
        await self._workflow_prelude(run, writer)
        if run.app.human_input is not None:
            return await self._pause_at_form(run, writer)
        await self._emit_steps(run, writer)
        outcome = await self._stream_tokens(run, writer, lambda token: self._message(run, token))
        is_1x = run.dialect.is_1x
        if outcome == Outcome.ERROR:
            await writer.send(self._node_finished(run, "llm", failed=True))
            failure = UPSTREAM_FAILURES[run.app.version]
            await writer.send(self._workflow_finished(run, "failed", {} if is_1x else None, failure))
            if not is_1x:  # 1.x sends no error event after a failed chatflow (105)
                await writer.send(self._upstream_error(run, code="invalid_param", prefix="Run failed: "))
            return outcome
        if outcome == Outcome.STOPPED:
            stopped = STOPPED_BY_USER[run.app.version]
            await writer.send(self._workflow_finished(run, "stopped", {} if is_1x else None, stopped))
            if not is_1x:  # 1.x ends a stopped chatflow without message_end (36, 108)
                await writer.send(self._message_end(run, usage=self._stopped_usage(run)))
            return outcome
        if outcome != Outcome.DONE:
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

    async def _emit_workflow(self, run: Run, writer: EventWriter) -> str:
        """workflow_started, nodes, text_chunk×N (if the End node streams), nodes, workflow_finished."""
        await self._workflow_prelude(run, writer)
        if run.app.human_input is not None:
            return await self._pause_at_form(run, writer)
        await self._emit_steps(run, writer)
        is_1x = run.dialect.is_1x
        if run.behaviour.workflow_streams_text:
            outcome = await self._stream_tokens(run, writer, lambda token: self._text_chunk(run, token))
        else:
            outcome = self._fault(run, 0) or Outcome.DONE
            if outcome == Outcome.DONE:
                run.sent, run.tokens_sent = run.answer, len(split_tokens(run.answer))
        if outcome == Outcome.ERROR:
            await writer.send(self._node_finished(run, "llm", failed=True))
            failure = UPSTREAM_FAILURES[run.app.version]
            await writer.send(self._workflow_finished(run, "failed", {} if is_1x else None, failure))
            return outcome
        if outcome == Outcome.STOPPED:
            stopped = STOPPED_BY_USER[run.app.version]
            await writer.send(self._workflow_finished(run, "stopped", {} if is_1x else None, stopped))
            return outcome
        if outcome != Outcome.DONE:
            return outcome
        await writer.send(self._node_finished(run, "llm"))
        await writer.send(self._node_started(run, "end"))
        if run.behaviour.replace_after is None:
            await self._moderate(run, writer)
        await writer.send(self._node_finished(run, "end"))
        await writer.send(self._workflow_finished(run, "succeeded", self._workflow_outputs(run), None))
        return outcome

    async def _workflow_run_detail(self, request: web.Request) -> web.Response:
        self._record(request, self._app_of(request), None)
        app = self._authenticate(request)
        if app.mode != "workflow":
            raise not_workflow_app(app.dialect)
        run = self.workflow_runs.get(request.match_info["run_id"])
        if run is None or run.app != app.name:
            raise DifyHTTPError(404, "not_found", "Workflow run not found.")
        if app.dialect.is_1x:  # 84, 60b, 66b: outputs an object, times in unix seconds
            inputs = with_timestamp(run)
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
