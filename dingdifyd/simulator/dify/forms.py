"""Human Input nodes for the fake Dify 1.16.1: the node an app pauses at, the forms it opens, and their rules.

Shaped like the capture's hitl apps (tests/fixtures/dify-1.16.1, cases 60–79): Start → Human Input `review` →
Answer (chatflow) or End (workflow). The node's form has a paragraph `comment` and the actions Approve and Reject
unless a test declares others; it is delivered to the web app (so it has a form token) unless `webapp=False`.
Submitting it (`POST /form/human_input/:token`) is checked the way Dify checks it: the action must be one of the
node's, every input must be present (values are not type-checked, 68c), a submitted form is 412 submitted, an
expired one 412 expired.
"""

from __future__ import annotations

import re
import secrets
import string
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONTENT = "Please review: {{#start.query#}}\n\nComment: {{#$output.comment#}}"
_TOKEN_ALPHABET = string.ascii_letters + string.digits
_OUTPUT = re.compile(r"\{\{#\$output\.([a-zA-Z_][a-zA-Z0-9_]{0,29})#\}\}")


def paragraph(name: str, default: str = "") -> dict[str, Any]:
    return {"output_variable_name": name, "type": "paragraph",
            "default": {"type": "constant", "selector": [], "value": default}}  # fmt: skip


def select(name: str, options: list[str]) -> dict[str, Any]:
    return {"output_variable_name": name, "type": "select",
            "option_source": {"type": "constant", "selector": [], "value": list(options)}}  # fmt: skip


def file_input(name: str, types: tuple[str, ...] = ("image", "document"), *, many: bool = False) -> dict[str, Any]:
    item: dict[str, Any] = {
        "output_variable_name": name, "type": "file-list" if many else "file",
        "allowed_file_types": list(types), "allowed_file_extensions": [],
        "allowed_file_upload_methods": ["local_file", "remote_url"],
    }  # fmt: skip
    if many:
        item["number_limits"] = 3
    return item


def action(action_id: str, title: str, style: str = "default") -> dict[str, Any]:
    return {"id": action_id, "title": title, "button_style": style}


@dataclass(frozen=True)
class HumanInputNode:
    """The Human Input node of a fake app (its DSL's `data`, in short)."""

    node_id: str = "review"
    title: str = "Review"
    form_content: str = DEFAULT_CONTENT
    inputs: tuple[dict[str, Any], ...] = (paragraph("comment"),)
    actions: tuple[dict[str, Any], ...] = (action("approve", "Approve", "primary"), action("reject", "Reject"))
    timeout: float = 3600.0  # seconds until the form expires (`timeout: 1`, `timeout_unit: hour`); 0: at once
    webapp: bool = True  # the web app is among its delivery methods: the form has a token the Service API may use

    def rendered(self, query: str) -> str:
        """The form text with the run's variables filled in and the `$output` placeholders kept."""
        return self.form_content.replace("{{#start.query#}}", query).replace("{{#sys.query#}}", query)


@dataclass
class FakeForm:
    """One form a paused run opened."""

    node: HumanInputNode
    run_id: str
    app_key: str
    query: str
    form_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    token: str | None = None
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0
    status: str = "waiting"  # waiting | submitted | timeout
    action_id: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    submitted_by: str = ""

    def __post_init__(self) -> None:
        if self.node.webapp and self.token is None:
            self.token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(22))
        if not self.expires_at:
            self.expires_at = self.created_at + self.node.timeout

    @property
    def content(self) -> str:
        return self.node.rendered(self.query)

    @property
    def expired(self) -> bool:
        return self.status == "timeout" or time.time() >= self.expires_at

    def event_data(self) -> dict[str, Any]:
        """`human_input_required.data` (60, 70)."""
        return {
            "form_id": self.form_id, "node_id": self.node.node_id, "node_title": self.node.title,
            "form_content": self.content, "inputs": [dict(item) for item in self.node.inputs],
            "actions": [dict(item) for item in self.node.actions], "display_in_ui": True,
            "form_token": self.token, "approval_channels": ["console"], "resolved_default_values": {},
            "expiration_time": int(self.expires_at),
        }  # fmt: skip

    def reason(self) -> dict[str, Any]:
        """One entry of `workflow_paused.data.reasons` (its keys in their order there)."""
        return {
            "TYPE": "human_input_required", "form_id": self.form_id, "form_content": self.content,
            "inputs": [dict(item) for item in self.node.inputs], "actions": [dict(item) for item in self.node.actions],
            "node_id": self.node.node_id, "node_title": self.node.title, "resolved_default_values": {},
            "form_token": self.token, "approval_channels": ["console"], "expiration_time": int(self.expires_at),
        }  # fmt: skip

    def definition(self) -> dict[str, Any]:
        """`GET /form/human_input/:token` (61)."""
        return {
            "form_content": self.content, "inputs": [dict(item) for item in self.node.inputs],
            "resolved_default_values": {}, "user_actions": [dict(item) for item in self.node.actions],
            "expiration_time": int(self.expires_at),
        }  # fmt: skip

    def refusal(self, action_id: str, data: dict[str, Any]) -> str | None:
        """Why Dify would refuse this submission (400 invalid_form_data), or None."""
        if action_id not in {a["id"] for a in self.node.actions}:
            return f"Invalid action: {action_id}"
        missing = [name for name in self.names if name not in data]
        return f"Missing required inputs: {', '.join(missing)}" if missing else None

    @property
    def names(self) -> list[str]:
        return [item["output_variable_name"] for item in self.node.inputs]

    @property
    def action_title(self) -> str:
        return next((a["title"] for a in self.node.actions if a["id"] == self.action_id), self.action_id)

    def outputs(self) -> dict[str, Any]:
        """The node's outputs once answered: each input, the action, and the form with the values filled in."""
        values = {name: self.data.get(name) for name in self.names}
        rendered = _OUTPUT.sub(lambda m: _text(values.get(m.group(1))), self.content)
        return {**values, "__action_id": self.action_id, "__action_value": self.action_title,
                "__rendered_content": rendered}  # fmt: skip

    def answer_pieces(self) -> list[tuple[str, list[str]]]:
        """What the capture's chatflow Answer node streams after the form (72): `Decision: <title> (<id>),
        comment: <comment>, query: <query>`, one piece per template part, with the variable it came from."""
        node = self.node.node_id
        pieces = [("Decision: ", ["answer", "answer"]), (self.action_title, [node, "__action_value"]),
                  (" (", ["answer", "answer"]), (self.action_id, [node, "__action_id"])]  # fmt: skip
        for item in self.node.inputs:
            name = item["output_variable_name"]
            pieces += [(f"), {name}: " if pieces[-1][0] == self.action_id else f", {name}: ", ["answer", "answer"]),
                       (_text(self.data.get(name)), [node, name])]  # fmt: skip
        closing = ", query: " if self.node.inputs else "), query: "
        pieces += [(closing, ["answer", "answer"]), (self.query, ["sys", "query"])]
        return pieces

    def workflow_outputs(self) -> dict[str, Any]:
        """What the capture's workflow End node outputs (66b): action, action_title, each input, query."""
        values = {name: self.data.get(name) for name in self.names}
        return {"action": self.action_id, "action_title": self.action_title, **values, "query": self.query}


def _text(value: Any) -> str:
    """An answered input as the Answer node prints it: text as is, a file by its name."""
    if isinstance(value, dict):
        return str(value.get("filename") or value.get("upload_file_id") or "")
    if isinstance(value, list):
        return ", ".join(_text(item) for item in value)
    return "" if value is None else str(value)
