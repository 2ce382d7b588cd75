"""A loopback fake of the Dify Service API, speaking 0.15.3 or 1.16.1 per app (docs/dify.md). Import from here.

server.py puts the endpoint families together as `FakeDify`: app info (app_info.py), generation and stop
(generation.py), the answer stream (streaming.py) of chat apps (chat.py) and workflow apps (workflow_events.py,
workflow.py), files (files.py), Human Input forms (human_input.py, forms.py) and the run events route
(run_events.py), over the shared state (core.py, model.py, errors.py, sse.py) and each version's bytes (dialect.py).
"""

from dingdifyd.simulator.dify.dialect import DIFY_0_15, DIFY_1_16, VERSIONS, Dialect
from dingdifyd.simulator.dify.errors import DifyHTTPError
from dingdifyd.simulator.dify.forms import FakeForm, HumanInputNode, action, file_input, paragraph, select
from dingdifyd.simulator.dify.model import (
    ANSWER_TAIL,
    MODERATED_ANSWER,
    MODES,
    REASONING,
    TOOL_IMAGE,
    UPSTREAM_FAILURES,
    Behaviour,
    Conversation,
    FakeApp,
    RecordedRequest,
    StopRecord,
    UploadedFile,
    WorkflowRun,
)
from dingdifyd.simulator.dify.server import FakeDify, running_fake_dify, start_fake_dify

__all__ = [
    "ANSWER_TAIL", "DIFY_0_15", "DIFY_1_16", "MODERATED_ANSWER", "MODES", "REASONING", "TOOL_IMAGE",
    "UPSTREAM_FAILURES", "VERSIONS", "Behaviour", "Conversation", "Dialect", "DifyHTTPError", "FakeApp", "FakeDify",
    "FakeForm", "HumanInputNode", "RecordedRequest", "StopRecord", "UploadedFile", "WorkflowRun", "action",
    "file_input", "paragraph", "running_fake_dify", "select", "start_fake_dify",
]  # fmt: skip
