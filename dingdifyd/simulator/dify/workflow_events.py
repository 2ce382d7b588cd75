"""The events of a workflow run (chatflow and workflow apps): workflow and node starts and ends, text chunks,
the pause; the run's `sys.*` inputs and outputs; and its run record (docs/dify.md#workflow-apps)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from dingdifyd.simulator.dify.forms import FakeForm
from dingdifyd.simulator.dify.model import REASONING, UPSTREAM_FAILURES, Run
from dingdifyd.simulator.dify.streaming import AnswerStream


class WorkflowEvents(AnswerStream):

    def _sys_inputs(self, run: Run) -> dict[str, Any]:
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

    _PARALLEL: ClassVar[dict[str, None]] = {
        "parallel_id": None,
        "parallel_start_node_id": None,
        "parent_parallel_id": None,
        "parent_parallel_start_node_id": None,
        "iteration_id": None,
    }

    def _workflow_event(self, run: Run, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return self._chunk(run, event, task_id=run.task_id, workflow_run_id=self._workflow_run_id(run), data=data)

    def _workflow_started(self, run: Run, *, reason: str = "initial") -> dict[str, Any]:
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

    def _node_started(self, run: Run, node_id: str) -> dict[str, Any]:
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
        self, run: Run, node_id: str, *, failed: bool = False, outputs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A node's `node_finished`: its inputs, process data and outputs per node kind, in 0.15.3's or 1.16.1's
        shape. Kept whole, so that each kind's two shapes sit side by side."""
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

    def _start_inputs(self, run: Run) -> dict[str, Any]:
        if run.dialect.is_1x:  # 1.x's start node shows the user inputs only (101, 60)
            return dict(run.inputs)
        return self._sys_inputs(run)

    def _workflow_finished(
        self, run: Run, status: str, outputs: dict[str, Any] | None, error: str | None,
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

    def _text_chunk(self, run: Run, token: str, selector: list[str] | None = None) -> dict[str, Any]:
        data = {"text": token, "from_variable_selector": selector or ["llm", "text"]}
        return self._chunk(run, "text_chunk", task_id=run.task_id, data=data)

    def _paused_event(self, run: Run, form: FakeForm) -> dict[str, Any]:
        data = {"workflow_run_id": self._workflow_run_id(run), "paused_nodes": [form.node.node_id], "outputs": {},
                "reasons": [form.reason()], "status": "paused", "created_at": run.created_at,
                "elapsed_time": run.elapsed(), "total_tokens": 0, "total_steps": 2}  # fmt: skip
        return self._workflow_event(run, "workflow_paused", data)

    def _finish_workflow_run(self, run: Run, status: str, outputs: dict[str, Any] | None, error: str | None) -> None:
        wf = run.workflow_run
        if wf is None:
            return
        wf.status, wf.outputs, wf.error = status, outputs, error
        wf.total_steps = 3 if status == "succeeded" else 2
        wf.total_tokens = run.usage()["total_tokens"] if status == "succeeded" else 0
        wf.finished_at = int(time.time())
        wf.elapsed_time = run.elapsed()
        self._runs_by_id.pop(wf.id, None)

    def _workflow_outputs(self, run: Run) -> dict[str, Any]:
        if run.dialect.is_1x:  # the capture's llm-workflow ends with answer = llm.text
            outputs: dict[str, Any] = {"answer": run.sent}
            if run.behaviour.answer_file:
                outputs["files"] = [self._answer_file_object(run)]
            return outputs | self.output_files.get(run.app.api_key, {})
        return {"answer": run.sent, "echo_query": run.query, **self.output_files.get(run.app.api_key, {})}

    def _run_data(self, run: Run) -> dict[str, Any]:
        wf = run.workflow_run
        assert wf is not None
        outputs = wf.outputs if wf.outputs is not None or not run.dialect.is_1x else {}
        return {
            "id": wf.id, "workflow_id": wf.workflow_id, "status": wf.status, "outputs": outputs,
            "error": wf.error, "elapsed_time": wf.elapsed_time, "total_tokens": wf.total_tokens,
            "total_steps": wf.total_steps, "created_at": wf.created_at, "finished_at": wf.finished_at,
        }  # fmt: skip
