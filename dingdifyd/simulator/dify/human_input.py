"""Human Input nodes (1.x): a run that reaches one pauses and opens a form; `GET/POST /form/human_input/:token`
read and answer it, and the answer resumes the run, whose events then go to its events route
(docs/dify.md#human-input). The nodes and forms themselves are in forms.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.errors import DifyHTTPError
from dingdifyd.simulator.dify.forms import FakeForm
from dingdifyd.simulator.dify.model import FakeApp, Run
from dingdifyd.simulator.dify.sse import EventWriter
from dingdifyd.simulator.dify.streaming import Outcome
from dingdifyd.simulator.dify.workflow_events import WorkflowEvents


class HumanInput(WorkflowEvents):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self.form_submissions: list[dict[str, Any]] = []  # accepted POST /form/human_input/:token bodies

    def _form_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/form/human_input/{token}", self._form_get),
            web.post("/v1/form/human_input/{token}", self._form_submit),
        ]

    def expire_form(self, token: str) -> None:
        """Let a form's time run out (its node's timeout passed): answering or reading it is then 412 expired."""
        self.forms[token].expires_at = time.time() - 1

    def _open_form(self, run: Run) -> FakeForm:
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

    async def _pause_at_form(self, run: Run, writer: EventWriter) -> str:
        """60, 70: the node starts, asks for its form, the run pauses, and the stream closes."""
        assert run.app.human_input is not None
        await writer.send(self._node_started(run, run.app.human_input.node_id))
        form = self._open_form(run)
        await writer.send(self._workflow_event(run, "human_input_required", form.event_data()))
        await writer.send(self._paused_event(run, form))
        return Outcome.PAUSED

    def _blocking_pause(self, run: Run) -> web.Response:
        """1.x: a run that reaches a Human Input node answers at once with the pause (68 workflow, 78 chatflow)."""
        form = self._open_form(run)
        wf = run.workflow_run
        assert wf is not None
        reasons = [form.reason()]
        if run.app.mode == "workflow":
            data = self._run_data(run) | {"paused_nodes": [form.node.node_id], "reasons": reasons}
            return run.dialect.blocking_body({"task_id": run.task_id, "workflow_run_id": wf.id, "data": data})
        metadata: dict[str, Any] = {"annotation_reply": None, "retriever_resources": [], "usage": None, "reasoning": {}}
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

    async def _resume(self, run: Run, form: FakeForm) -> None:
        """The answered form resumes its run: the events go to whoever listens on the run's events route (62,
        66d, 72). The same task, message and conversation; the human node runs again with the answer."""
        await asyncio.sleep(0)  # after the submission's 200 went out, as Dify's queued resume task would
        wf = run.workflow_run
        assert wf is not None
        self._paused.pop(wf.id, None)
        wf.status = "running"
        run.resumed = True
        writer = EventWriter(None, run.dialect, lambda obj: self._publish(wf.id, obj))
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
