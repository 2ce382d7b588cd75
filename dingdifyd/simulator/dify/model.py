"""The fake Dify's model: its apps and how they answer (`Behaviour`), what it records (requests, conversations,
stops, uploads, workflow runs), one generation being answered (`Run`), and the fake model's words."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dingdifyd.simulator.dify.dialect import ANSWER_TAILS, DIFY_0_15, DIFY_1_16, Dialect
from dingdifyd.simulator.dify.forms import FakeForm, HumanInputNode

DIFY_VERSION = DIFY_0_15  # the default; FakeDify(version=DIFY_1_16) or add_app(..., version=...) for 1.x
MODES = ("chat", "agent-chat", "advanced-chat", "workflow", "completion")
MODES_1X = (*MODES, "agent")  # 1.x's Dify Agent runtime answers on /chat-messages like an agent-chat app
CHAT_MODES = ("chat", "agent-chat", "advanced-chat", "agent")
WORKFLOW_MODES = ("advanced-chat", "workflow")  # modes with workflow runs (and, in 1.x, the run events route)
ONLY_INFO_MODES = ("channel", "rag-pipeline")  # 1.x modes the fake only names (/info, /parameters)

ANSWER_TAIL = ANSWER_TAILS[DIFY_0_15]
REASONING = "The user wants an echo; these are reasoning words."
STOPPED_BY_USER = {DIFY_0_15: "Stopped by user.", DIFY_1_16: "Aborted: User requested stop"}
MODERATED_ANSWER = "Sorry, I cannot talk about that."  # the preset answer of `replace_after` without `replace_with`
UPSTREAM_FAILURES = {
    DIFY_0_15: (
        "[openai_api_compatible] Error: API request failed with status code 500: "
        '{"error": {"message": "fake upstream failure", "type": "server_error"}}'
    ),
    DIFY_1_16: "fake upstream failure (fail500)",
}
TOOL_IMAGE = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
ID_NAMESPACE = uuid.UUID("5f0c8a34-8d2e-4b8e-9a56-0d9f3c1b7e21")
CHAT_FORM = [
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
TEXT_FORM = [
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


@dataclass
class Run:
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


def split_tokens(text: str) -> list[str]:
    """The fake model's tokens: the first word, then " word" each, then an empty closing delta."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:]), ""]


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def with_timestamp(record: WorkflowRun) -> dict[str, Any]:
    """A run's inputs as 1.x stores them: `sys.timestamp` after `sys.app_id` (84, 60c)."""
    inputs: dict[str, Any] = {}
    for name, value in record.inputs.items():
        inputs[name] = value
        if name == "sys.app_id":
            inputs["sys.timestamp"] = record.created_at
    return inputs
