"""The answer stream every app shares: the fake model's tokens, the faults a test asks for (errors, stalls,
cuts, clean ends, stops), moderation, step events, a 1.x client lost mid-stream, and the chunk shapes of the
events that carry text (docs/dify.md#stream-events)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dify.files import DifyFiles
from dingdifyd.simulator.dify.model import (
    ID_NAMESPACE,
    MODERATED_ANSWER,
    REASONING,
    TOOL_IMAGE,
    UPSTREAM_FAILURES,
    WORKFLOW_MODES,
    Run,
    split_tokens,
)
from dingdifyd.simulator.dify.sse import EventWriter


class Outcome:
    DONE = "done"
    STOPPED = "stopped"
    ERROR = "error"
    STALL = "stall"
    CUT = "cut"
    END = "end"
    PAUSED = "paused"  # 1.x: a human input node waits; the stream closes after workflow_paused


class AnswerStream(DifyFiles):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self.first_text_at: dict[str, float] = {}  # user -> when the first answer text of theirs was written

    # --- the token loop and its faults --------------------------------------------------------------------

    def _writer(self, run: Run, response: web.StreamResponse | None) -> EventWriter:
        run_id = run.workflow_run.id if run.workflow_run is not None else ""
        if run.workflow_run is not None:
            self._runs_by_id[run_id] = run
        return EventWriter(response, run.dialect, lambda obj: self._publish(run_id, obj))

    def _fault(self, run: Run, index: int) -> str | None:
        b = run.behaviour
        if run.fails_upstream and index == 0:
            return Outcome.ERROR
        if b.stopped_after is not None and b.stopped_after == index:
            run.stop.set()  # the Dify console (or another host) stopped it
            return Outcome.STOPPED
        for outcome, after in (
            (Outcome.ERROR, b.error_after),
            (Outcome.STALL, b.stall_after),
            (Outcome.CUT, b.cut_after),
            (Outcome.END, b.end_after),
        ):
            if after is not None and after == index:
                return outcome
        return None

    def _tokens(self, run: Run) -> list[tuple[str, str]]:
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
    def _separates_reasoning(run: Run) -> bool:
        return run.dialect.is_1x and run.app.mode in WORKFLOW_MODES

    async def _stream_tokens(self, run: Run, writer: EventWriter, make_event: Callable[[str], dict[str, Any]]) -> str:
        tokens = self._tokens(run)
        index = 0  # of text tokens: faults and moderation count those
        for position, (kind, token) in enumerate(tokens):
            if kind == "reasoning":
                await writer.send(self._reasoning(run, token, final=False))
                continue
            fault = self._fault(run, index)
            if fault in (Outcome.CUT, Outcome.STALL, Outcome.END) and self._follows(run):
                await self._lose_client(run, writer, fault)
                fault = None
            if fault is not None:
                return fault
            if self._closing.is_set():
                return Outcome.CUT
            if run.stop.is_set():
                return Outcome.STOPPED
            if run.behaviour.replace_after is not None and index == run.behaviour.replace_after:
                await self._moderate(run, writer)
                return Outcome.DONE  # moderated: nothing more of the original answer
            latency = run.behaviour.first_token_delay if index == 0 else 0.0
            if latency and await self._pause(run, latency):
                return Outcome.CUT if self._closing.is_set() else Outcome.STOPPED
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
                return Outcome.CUT if self._closing.is_set() else Outcome.STOPPED
        return self._fault(run, index) or Outcome.DONE

    def _follows(self, run: Run) -> bool:
        """1.x keeps a workflow-based run going when its client is lost: its events route can follow it."""
        return run.dialect.is_1x and run.workflow_run is not None

    async def _lose_client(self, run: Run, writer: EventWriter, how: str) -> None:
        """The client loses the stream (a proxy cut it, it went silent, it ended cleanly); the run goes on once
        someone listens on its events route, or after `hold_for_subscriber`."""
        if how == Outcome.END:
            with contextlib.suppress(ConnectionError):
                await writer.end_client()
        writer.detach(how)
        await writer.stop_pings()
        if how == Outcome.CUT and writer.transport is not None:
            writer.transport.close()
        assert run.workflow_run is not None
        await self._wait_subscriber(run.workflow_run.id, run.behaviour.hold_for_subscriber)

    async def _moderate(self, run: Run, writer: EventWriter) -> None:
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

    async def _emit_steps(self, run: Run, writer: EventWriter) -> None:
        """Step events a test asks for (`steps`), before the answer: what the bridge shows as progress."""
        for step in run.behaviour.steps:
            for event in self._step_events(run, step):
                await writer.send(event)

    def _node(self, run: Run, node_id: str) -> dict[str, Any]:
        """A node of the fake's workflow as its events describe it (step events and workflow events alike)."""
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
            "id": str(uuid.uuid5(ID_NAMESPACE, f"{run.task_id}:{node_id}")),
            "node_id": node_id,
            "node_type": node_type,
            "title": title,
            "index": index,
            "predecessor_node_id": predecessor,
        }
        if run.dialect.is_1x:  # 1.x numbers every node 1 and names no predecessor (101)
            node |= {"index": 1, "predecessor_node_id": None}
        return node

    def _step_events(self, run: Run, step: str) -> list[dict[str, Any]]:
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

    # --- chunk shapes: chat apps start every chunk with event, conversation_id, message_id, created_at;
    # completion apps with event, message_id, created_at; workflow apps with event, workflow_run_id ----------

    @staticmethod
    def _workflow_run_id(run: Run) -> str:
        if run.workflow_run is not None:
            return run.workflow_run.id
        # chatflow runs are not kept; their id only needs to be stable within the stream
        return str(uuid.uuid5(ID_NAMESPACE, run.task_id))

    def _chunk(self, run: Run, event: str, **body: Any) -> dict[str, Any]:
        if run.app.mode == "workflow":
            return {"event": event, "workflow_run_id": self._workflow_run_id(run), **body}
        chunk: dict[str, Any] = {"event": event}
        if run.app.mode != "completion":
            chunk["conversation_id"] = run.conversation_id
        chunk |= {"message_id": run.message_id, "created_at": run.created_at}
        return chunk | body

    def _message(self, run: Run, token: str, selector: list[str] | None = None) -> dict[str, Any]:
        if selector is None:
            if run.app.mode == "advanced-chat":
                selector = ["llm", "text"]
            elif run.dialect.is_1x:
                selector = []
        return self._chunk(
            run, "message", task_id=run.task_id, id=run.message_id, answer=token, from_variable_selector=selector
        )

    def _reasoning(self, run: Run, text: str, *, final: bool) -> dict[str, Any]:
        message_id = run.message_id if run.app.mode != "workflow" else None
        data = {"message_id": message_id, "reasoning": text, "node_id": "llm", "is_final": final}
        return self._chunk(run, "reasoning_chunk", task_id=run.task_id, data=data)

    def _metadata(self, run: Run, *, usage: dict[str, Any] | None = None, blocking: bool = False) -> dict[str, Any]:
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

    def _message_end(self, run: Run, *, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        if run.dialect.is_1x:
            files: list[Any] | None = [self._answer_file_object(run)] if run.behaviour.answer_file else []
        else:
            files = [] if run.app.mode == "advanced-chat" else None
        return self._chunk(
            run, "message_end", task_id=run.task_id, id=run.message_id, metadata=self._metadata(run, usage=usage),
            files=files,
        )  # fmt: skip

    def _stopped_usage(self, run: Run) -> dict[str, Any]:
        zero = dict.fromkeys(("prompt_tokens", "completion_tokens", "total_tokens"), 0)
        return run.usage() | zero | {"latency": 0.0}

    def _upstream_error(self, run: Run, *, code: str = "completion_request_error", prefix: str = "") -> dict[str, Any]:
        failure = UPSTREAM_FAILURES[run.app.version]
        return self._chunk(run, "error", code=code, status=400, message=prefix + failure)

    def _message_file(self, run: Run) -> dict[str, Any]:
        url = self.add_tool_file(TOOL_IMAGE)
        return self._chunk(
            run,
            "message_file",
            task_id=run.task_id,
            id=str(uuid.uuid4()),
            type="image",
            belongs_to="assistant",
            url=url,
        )
