"""Human-input forms (Dify ≥ 1.13), as typed values: what a paused run asks a person to fill in.

A run with a Human Input node pauses there: the stream sends `human_input_required` (one form) and
`workflow_paused` (its `reasons`, one per paused node) and closes; a blocking request answers with the same
`reasons` (transcripts 60, 68, 70, 78). `GET /form/human_input/:token` gives the form again with its inputs
resolved (61). A form is answered with one of its actions and a value for every input
(`POST /form/human_input/:token`); its `form_token` is null unless the node delivers to the web app, the only
recipient the Service API may answer for.

Everything here is pure: parsing never raises, and a form round-trips through `to_dict` / `from_dict` (the
store keeps pending forms that way).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PARAGRAPH = "paragraph"
FILE = "file"
FILE_LIST = "file-list"
FILE_TYPES = (FILE, FILE_LIST)


@dataclass(frozen=True)
class FormField:
    """One input of a form: its output variable, its type, and what it may hold."""

    name: str
    type: str
    default: str = ""
    options: tuple[str, ...] = ()  # select: the choices (constant, or resolved by GET /form)
    file_types: tuple[str, ...] = ()  # file / file-list: image, document, audio, video, custom
    file_extensions: tuple[str, ...] = ()
    max_files: int = 0  # file-list: 0 = no limit

    @property
    def is_file(self) -> bool:
        return self.type in FILE_TYPES


@dataclass(frozen=True)
class FormAction:
    id: str
    title: str
    style: str = "default"


@dataclass(frozen=True)
class HumanInputForm:
    """One pending form of a paused run."""

    form_id: str
    node_id: str
    node_title: str
    content: str  # rendered markdown; `{{#$output.name#}}` marks where an input's value goes
    fields: tuple[FormField, ...]
    actions: tuple[FormAction, ...]
    token: str | None  # None: not deliverable to the web app, so not answerable through the Service API
    expires_at: float | None  # unix seconds
    approval_channels: tuple[str, ...] = ()
    defaults: Mapping[str, str] = field(default_factory=dict)  # resolved_default_values

    def field_named(self, name: str) -> FormField | None:
        return next((f for f in self.fields if f.name == name), None)

    def default_of(self, form_field: FormField) -> str:
        return str(self.defaults.get(form_field.name) or form_field.default or "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "form_id": self.form_id, "node_id": self.node_id, "node_title": self.node_title,
            "content": self.content, "token": self.token, "expires_at": self.expires_at,
            "approval_channels": list(self.approval_channels), "defaults": dict(self.defaults),
            "fields": [
                {"name": f.name, "type": f.type, "default": f.default, "options": list(f.options),
                 "file_types": list(f.file_types), "file_extensions": list(f.file_extensions),
                 "max_files": f.max_files}
                for f in self.fields
            ],
            "actions": [{"id": a.id, "title": a.title, "style": a.style} for a in self.actions],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HumanInputForm:
        fields = tuple(
            FormField(
                name=str(f["name"]), type=str(f["type"]), default=str(f.get("default") or ""),
                options=tuple(str(o) for o in f.get("options") or ()),
                file_types=tuple(str(t) for t in f.get("file_types") or ()),
                file_extensions=tuple(str(e) for e in f.get("file_extensions") or ()),
                max_files=int(f.get("max_files") or 0),
            )
            for f in data.get("fields") or ()
        )
        actions = tuple(
            FormAction(str(a["id"]), str(a["title"]), str(a.get("style") or "default"))
            for a in data.get("actions") or ()
        )
        expires = data.get("expires_at")
        return cls(
            form_id=str(data.get("form_id") or ""), node_id=str(data.get("node_id") or ""),
            node_title=str(data.get("node_title") or ""), content=str(data.get("content") or ""),
            fields=fields, actions=actions, token=data.get("token") or None,
            expires_at=float(expires) if isinstance(expires, int | float) else None,
            approval_channels=tuple(str(c) for c in data.get("approval_channels") or ()),
            defaults={str(k): str(v) for k, v in (data.get("defaults") or {}).items()},
        )  # fmt: skip


# --- parsing Dify's shapes ----------------------------------------------------------------------------------


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(item) for item in value if isinstance(item, str | int | float)) if isinstance(value, list) else ()


def parse_field(raw: Any) -> FormField | None:
    """One entry of a form's `inputs`; None when it has no output variable (nothing could be submitted)."""
    if not isinstance(raw, Mapping):
        return None
    name = _str(raw.get("output_variable_name")).strip()
    if not name:
        return None
    kind = _str(raw.get("type")) or PARAGRAPH
    default = raw.get("default")
    default_value = ""
    if isinstance(default, Mapping) and default.get("type") == "constant":
        default_value = _str(default.get("value"))
    options: tuple[str, ...] = ()
    source = raw.get("option_source")
    if isinstance(source, Mapping):
        options = _strings(source.get("value"))
    elif isinstance(raw.get("options"), list):
        options = _strings(raw.get("options"))
    try:
        max_files = max(int(raw.get("number_limits") or 0), 0)
    except (TypeError, ValueError):
        max_files = 0
    return FormField(
        name=name, type=kind, default=default_value, options=options,
        file_types=_strings(raw.get("allowed_file_types")),
        file_extensions=tuple(e.lower().lstrip(".") for e in _strings(raw.get("allowed_file_extensions"))),
        max_files=max_files,
    )  # fmt: skip


def parse_action(raw: Any) -> FormAction | None:
    if not isinstance(raw, Mapping):
        return None
    action_id = _str(raw.get("id")).strip()
    if not action_id:
        return None
    title = _str(raw.get("title")).strip() or action_id
    return FormAction(action_id, title, _str(raw.get("button_style")) or "default")


def parse_form(data: Any) -> HumanInputForm | None:
    """A form from `human_input_required.data`, a `workflow_paused` reason, or the form route's answer.

    None when the shape is not a form at all (no actions: nothing a person could choose)."""
    if not isinstance(data, Mapping):
        return None
    raw_actions = data.get("actions") if "actions" in data else data.get("user_actions")
    actions = tuple(a for a in map(parse_action, raw_actions or []) if a is not None) if isinstance(
        raw_actions, list
    ) else ()
    if not actions:
        return None
    raw_fields = data.get("inputs")
    fields = tuple(f for f in map(parse_field, raw_fields) if f is not None) if isinstance(raw_fields, list) else ()
    token = data.get("form_token")
    expires = data.get("expiration_time")
    defaults = data.get("resolved_default_values")
    return HumanInputForm(
        form_id=_str(data.get("form_id")), node_id=_str(data.get("node_id")),
        node_title=_str(data.get("node_title")), content=_str(data.get("form_content")),
        fields=fields, actions=actions,
        token=token if isinstance(token, str) and token else None,
        expires_at=float(expires) if isinstance(expires, int | float) and not isinstance(expires, bool) else None,
        approval_channels=_strings(data.get("approval_channels")),
        defaults={str(k): str(v) for k, v in defaults.items()} if isinstance(defaults, Mapping) else {},
    )  # fmt: skip


def forms_of_pause(data: Any) -> tuple[HumanInputForm, ...]:
    """The forms a pause waits on: `workflow_paused.data.reasons` (stream) or `data.reasons` (blocking)."""
    reasons = data.get("reasons") if isinstance(data, Mapping) else None
    if not isinstance(reasons, list):
        return ()
    forms = []
    for reason in reasons:
        if isinstance(reason, Mapping) and reason.get("TYPE", "human_input_required") == "human_input_required":
            form = parse_form(reason)
            if form is not None:
                forms.append(form)
    return tuple(forms)


def with_resolved(form: HumanInputForm, definition: Mapping[str, Any]) -> HumanInputForm:
    """`form` with what `GET /form/human_input/:token` resolved (select options from variables, defaults)."""
    fresh = parse_form({**definition, "form_token": form.token, "form_id": form.form_id,
                        "node_id": form.node_id, "node_title": form.node_title})  # fmt: skip
    if fresh is None:
        return form
    fields = tuple(
        _merge_field(old, fresh.field_named(old.name)) for old in form.fields
    ) if fresh.fields else form.fields
    return HumanInputForm(
        form_id=form.form_id, node_id=form.node_id, node_title=form.node_title,
        content=fresh.content or form.content, fields=fields, actions=fresh.actions or form.actions,
        token=form.token, expires_at=fresh.expires_at or form.expires_at,
        approval_channels=form.approval_channels, defaults={**form.defaults, **fresh.defaults},
    )  # fmt: skip


def _merge_field(old: FormField, new: FormField | None) -> FormField:
    if new is None:
        return old
    return FormField(
        name=old.name, type=new.type or old.type, default=new.default or old.default,
        options=new.options or old.options, file_types=new.file_types or old.file_types,
        file_extensions=new.file_extensions or old.file_extensions, max_files=new.max_files or old.max_files,
    )  # fmt: skip
