"""1.x's run events route, `GET /workflow/:run_id/events`: follow a workflow run from elsewhere, with a
snapshot of the run so far if asked; a finished run answers its end at once (docs/dify.md#run-events)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.errors import ROUTE_MISMATCH, DifyHTTPError
from dingdifyd.simulator.dify.model import WORKFLOW_MODES, FakeApp, Run, WorkflowRun, with_timestamp
from dingdifyd.simulator.dify.sse import Subscription
from dingdifyd.simulator.dify.workflow_events import WorkflowEvents

log = logging.getLogger(__name__)

class RunEventsRoutes(WorkflowEvents):
    def _run_events_routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/workflow/{run_id}/events", self._run_events)]

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
            raise DifyHTTPError(400, "not_workflow_app", ROUTE_MISMATCH)
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
        subscription = Subscription(continue_on_pause=request.query.get("continue_on_pause") == "true")
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
        self, request: web.Request, response: web.StreamResponse, app: FakeApp, subscription: Subscription
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

    def _snapshot(self, run: Run) -> list[dict[str, Any]]:
        """`include_state_snapshot=true`: the run so far from Dify's records (60c, 70b), in their key order."""
        wf = run.workflow_run
        assert wf is not None
        context = {}
        if run.app.mode == "advanced-chat":
            context = {"conversation_id": run.conversation_id, "message_id": run.message_id,
                       "created_at": run.created_at}  # fmt: skip
        head = {"task_id": run.task_id, "workflow_run_id": wf.id}
        inputs = with_timestamp(wf) if run.app.mode == "workflow" else wf.inputs
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
