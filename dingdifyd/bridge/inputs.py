"""Which Dify inputs a message fills: the pure rules over the app's input form (`GET /parameters`).

- workflow / completion apps take the person's text in an input variable: `dify_input_variable` when the
  config names one, else `query` when the app declares it, else the app's single text input (context variables
  left aside), else `query`.
- DingTalk context (sender staff id, nick, chat type, chat title, robot code) goes to the variables `dify_inputs`
  names, and only to those the app declares: a value is cut to the variable's `max_length`, and a `select` gets
  it only when it is one of its options, so a context value never makes Dify refuse the request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dingdifyd.apptypes import TEXT_INPUT_APP_TYPES
from dingdifyd.models import IncomingMessage

DEFAULT_TEXT_VARIABLE = "query"
TEXT_KINDS = ("text-input", "paragraph")
FILE_KINDS = ("file", "file-list")
# Context that DingTalk leaves empty in some chats (no title in 1:1, no staff id for external people).
SOMETIMES_EMPTY = {"chat_title": "1:1 chats have no title", "staff_id": "people outside the org have none"}


@dataclass(frozen=True)
class InputField:
    variable: str
    kind: str  # text-input | paragraph | select | number | file | file-list | ...
    required: bool = False
    max_length: int | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class AppParameters:
    """What the bridge uses of `GET /parameters`."""

    fields: tuple[InputField, ...] = ()
    suggested_after_answer: bool = False
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # all of it (upload rules)

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> AppParameters:
        fields: list[InputField] = []
        form = obj.get("user_input_form")
        for item in form if isinstance(form, list) else ():
            if not isinstance(item, dict):
                continue
            for kind, spec in item.items():
                if not isinstance(spec, dict) or not isinstance(spec.get("variable"), str):
                    continue
                max_length = spec.get("max_length")
                options = spec.get("options")
                fields.append(
                    InputField(
                        variable=spec["variable"],
                        kind=str(kind),
                        required=bool(spec.get("required")),
                        max_length=max_length if isinstance(max_length, int) and max_length > 0 else None,
                        options=tuple(str(o) for o in options) if isinstance(options, list) else (),
                    )
                )
        suggested = obj.get("suggested_questions_after_answer")
        enabled = isinstance(suggested, dict) and suggested.get("enabled") is True
        return cls(fields=tuple(fields), suggested_after_answer=enabled, raw=obj)

    def field(self, variable: str) -> InputField | None:
        return next((f for f in self.fields if f.variable == variable), None)


def text_input_variable(
    params: AppParameters | None, explicit: str | None, context_variables: Mapping[str, str] | None = None
) -> str:
    """The variable that receives the person's text in a workflow or completion app."""
    if explicit:
        return explicit
    if params is None or params.field(DEFAULT_TEXT_VARIABLE) is not None:
        return DEFAULT_TEXT_VARIABLE
    taken = set((context_variables or {}).values())
    texts = [f for f in params.fields if f.kind in TEXT_KINDS and f.variable not in taken]
    if len(texts) > 1:
        texts = [f for f in texts if f.required]  # several: the one the app cannot run without
    return texts[0].variable if len(texts) == 1 else DEFAULT_TEXT_VARIABLE


def context_values(message: IncomingMessage) -> dict[str, str]:
    return {
        "staff_id": message.sender_staff_id,
        "nick": message.sender_nick,
        "chat_type": "group" if message.is_group else "single",
        "chat_title": message.conversation_title,
        "robot_code": message.robot_code,
    }


def context_inputs(
    message: IncomingMessage, mapping: Mapping[str, str], params: AppParameters | None
) -> dict[str, Any]:
    """The context inputs for this message. With the form unknown (Dify did not answer /parameters), every
    mapped value is passed: Dify ignores inputs an app does not declare."""
    values = context_values(message)
    inputs: dict[str, Any] = {}
    for key, variable in mapping.items():
        value = values.get(key, "")
        if not value:
            continue
        if params is not None:
            field = params.field(variable)
            if field is None or field.kind not in (*TEXT_KINDS, "select"):
                continue
            if field.kind == "select" and value not in field.options:
                continue
            if field.max_length is not None:
                value = value[: field.max_length]
        inputs[variable] = value
    return inputs


@dataclass(frozen=True)
class InputGap:
    """A required input the bridge cannot always fill, and why."""

    field: InputField
    reason: str
    blocking: bool  # True: every request fails; False: some requests may


def input_gaps(params: AppParameters, app_type: str, text_variable: str, mapping: Mapping[str, str]) -> list[InputGap]:
    """The required inputs of the app that a DingTalk message does not (always) fill."""
    filled_by = {variable: key for key, variable in mapping.items()}
    gaps: list[InputGap] = []
    for field in params.fields:
        if not field.required:
            continue
        if app_type in TEXT_INPUT_APP_TYPES and field.variable == text_variable:
            continue
        key = filled_by.get(field.variable)
        if key is not None:
            if field.kind == "select":
                gaps.append(InputGap(field, f"gets the {key} only when it is one of its options", False))
            elif field.kind not in TEXT_KINDS:
                gaps.append(InputGap(field, f"is a {field.kind} input; the {key} is text", True))
            elif key in SOMETIMES_EMPTY:
                gaps.append(InputGap(field, f"gets the {key}, which can be empty ({SOMETIMES_EMPTY[key]})", False))
            continue
        if field.kind in FILE_KINDS:
            gaps.append(InputGap(field, "is a required file input: only a message with a file can fill it", False))
        else:
            gaps.append(InputGap(field, "is required and nothing fills it", True))
    return gaps
