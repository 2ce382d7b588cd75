"""Human-input forms in a chat: how a paused run's form is shown, and how a person's reply answers it. Pure.

A Dify run with a Human Input node pauses for a form (dify/forms.py). The person who asked sees it in the card:
its text, its fields, and its actions, numbered. They answer by replying in the same chat:

    2                       the second action, every field left as it is (its default, or empty)
    Approve looks good      an action by its title; with one text field, the rest of the reply fills it
    1                       several fields: one per line, `name: value`; a line without a name goes on
    comment: ship it            with the field above
    size: 2                 a select field takes its option's number or its text

A file field is filled by the picture or file sent next. A reply that does not start with an action is not an
answer: it is a new question, and the form stays pending. `answer(...)` is what a card button (the interactive
card) will call too: "answer this form with action X and inputs Y".
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dingdifyd.dify.forms import FormAction, FormField, HumanInputForm

# --- what people read (English for now; a later issue moves these into gettext catalogs) --------------------

UNTITLED_FORM = "Form"  # a form whose node has no title
UNNAMED_ASKER = "the person who asked"
FORM_HEADING = "📝 **{title}**"
FORM_FIELDS_HEADING = "**To fill in:**"
FORM_FIELD_TEXT = "- `{name}`"
FORM_FIELD_TEXT_DEFAULT = "- `{name}` (if left out: {default})"
FORM_FIELD_SELECT = "- `{name}`: one of {options}"
FORM_FIELD_SELECT_MANY = "- `{name}`: one of {options} … and {more} more (reply with an option's number or text)"
FORM_FIELD_FILE = "- `{name}`: a picture or file, sent after your answer"
FORM_ACTIONS_HEADING = "**Reply with the number or the name of your choice:**"
FORM_ACTION = "{number}. {title}"
FORM_HOW_ONE_FIELD = "Write the `{name}` after your choice, e.g. `1 {example}`."
FORM_HOW_FIELDS = "Then one line per field, `name: value`, e.g.:\n```\n1\n{example}\n```"
FORM_EXPIRES_MINUTES = "⏳ Please answer within {minutes} minutes."
FORM_EXPIRES_HOURS = "⏳ Please answer within {hours} hours."
FORM_EXPIRED = "⌛ This form expired."
FORM_ELSEWHERE = (
    "📝 The app waits for “{title}”, which cannot be answered here: it is handled in {channels}."
)
FORM_CHANNELS = {"console": "the Dify console", "email": "email", "webapp": "the Dify web app"}
FORM_SOMEWHERE = "Dify"
FORM_CHANNELS_JOIN = " or "  # between two of the places a form is handled in
FORM_UNAVAILABLE = "📝 The app waits for “{title}”, but the form could not be read here. Please ask again later."

ANSWER_EXPIRED = "⌛ The form “{title}” expired before your answer came. Please ask again."
ANSWER_TOO_LATE = "The form “{title}” has already been answered."
ANSWER_GONE = "The form “{title}” no longer exists, so your answer was not sent."
ANSWER_REFUSED = "The app did not take this answer to “{title}”: {reason}"
ANSWER_NOT_PASSED = "Your answer to “{title}” was sent. What the app does next cannot be shown here."
ANSWER_INVALID = "{reason}\n\n(The form “{title}” is still waiting for your answer.)"
ANSWER_SEND_FILE = "Now send the picture or file for `{name}` (the form “{title}”)."
ANSWER_FILE_WRONG = "`{name}` takes {kinds}; the form “{title}” is still waiting for it."
ONLY_ASKER = "Only {asker} can answer the form “{title}”."
STILL_PENDING = "📝 The form “{title}” is still waiting for your answer: reply with the number of your choice."

INVALID_OPTION = "“{value}” is not an option of `{name}`: reply with its number (1–{count}) or its text."
INVALID_NO_OPTION = "Please choose an option of `{name}`: its number (1–{count}) or its text."
INVALID_UNKNOWN_FIELD = "The form has no field `{name}`; its fields are: {names}."
INVALID_NO_FIELD_NAME = "Please write each field on a line of its own as `name: value` (fields: {names})."

MAX_OPTIONS_SHOWN = 20  # a select with more shows this many; every number still answers
LATE_ANSWER_GRACE = 24 * 3600.0  # a pending form is kept this long after it expired, to tell a late answer so
NO_EXPIRY_KEEP = 7 * 24 * 3600.0  # a form that names no expiry is forgotten after this
_FILE_KINDS = {"image": "pictures", "document": "documents", "audio": "audio files", "video": "videos",
               "custom": "files"}  # fmt: skip
_SEPARATORS = " \t:：,，.。)）-—"


# --- the pending form, as stored --------------------------------------------------------------------------


@dataclass(frozen=True)
class PendingForm:
    """A form waiting for one person's answer in one chat, with what is needed to answer it and go on."""

    form: HumanInputForm
    app: str  # the Dify app's namespace (the bot's, or a route's)
    workflow_run_id: str
    task_id: str
    dify_user: str  # the Dify end user the run belongs to: its events route answers them only
    asker: str  # the person's id (staff id or sender id)
    asker_name: str
    conversation_id: str = ""  # a chatflow's Dify conversation
    created_at: float = 0.0
    # an answer waiting for files: the chosen action and the fields filled so far
    action_id: str = ""
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return title_of(self.form)

    def expired(self, now: float) -> bool:
        return self.form.expires_at is not None and now >= self.form.expires_at

    def forget_at(self) -> float:
        """When the store may forget it: a day after it expired (a late answer is still told), or after a week."""
        if self.form.expires_at is not None:
            return self.form.expires_at + LATE_ANSWER_GRACE
        return (self.created_at or time.time()) + NO_EXPIRY_KEEP

    def to_dict(self) -> dict[str, Any]:
        return {
            "form": self.form.to_dict(), "app": self.app, "workflow_run_id": self.workflow_run_id,
            "task_id": self.task_id, "dify_user": self.dify_user, "asker": self.asker, "asker_name": self.asker_name,
            "conversation_id": self.conversation_id, "created_at": self.created_at, "action_id": self.action_id,
            "inputs": dict(self.inputs),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingForm | None:
        """None for a record that is not one (an older or damaged record is dropped, not fatal)."""
        try:
            return cls(
                form=HumanInputForm.from_dict(data["form"]), app=str(data["app"]),
                workflow_run_id=str(data["workflow_run_id"]), task_id=str(data.get("task_id") or ""),
                dify_user=str(data["dify_user"]), asker=str(data["asker"]),
                asker_name=str(data.get("asker_name") or ""), conversation_id=str(data.get("conversation_id") or ""),
                created_at=float(data.get("created_at") or 0.0), action_id=str(data.get("action_id") or ""),
                inputs=dict(data.get("inputs") or {}),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


# --- showing a form -----------------------------------------------------------------------------------------


def render_form(form: HumanInputForm, now: float) -> str:
    """The card text of a pending form: its content, what to fill in, the actions numbered, how to answer."""
    parts = [FORM_HEADING.format(title=title_of(form))]
    content = _content(form)
    if content:
        parts.append(content)
    fields = [f for f in form.fields]
    if fields:
        parts.append("\n".join([FORM_FIELDS_HEADING, *(_field_line(form, f) for f in fields)]))
    actions = [FORM_ACTION.format(number=n, title=a.title) for n, a in enumerate(form.actions, 1)]
    parts.append("\n".join([FORM_ACTIONS_HEADING, *actions]))
    typed = [f for f in fields if not f.is_file]
    if len(typed) == 1:
        parts.append(FORM_HOW_ONE_FIELD.format(name=typed[0].name, example=_example(typed[0])))
    elif len(typed) > 1:
        example = "\n".join(f"{f.name}: {_example(f)}" for f in typed)
        parts.append(FORM_HOW_FIELDS.format(example=example))
    expiry = expiry_line(form, now)
    if expiry:
        parts.append(expiry)
    return "\n\n".join(parts)


def render_elsewhere(form: HumanInputForm) -> str:
    """A form Dify delivers to no one the Service API may answer for (`form_token: null`): where it is handled."""
    channels = [FORM_CHANNELS.get(channel, channel) for channel in form.approval_channels]
    return FORM_ELSEWHERE.format(title=title_of(form), channels=FORM_CHANNELS_JOIN.join(channels) or FORM_SOMEWHERE)


def title_of(form: HumanInputForm) -> str:
    return form.node_title or UNTITLED_FORM


def expiry_line(form: HumanInputForm, now: float) -> str:
    if form.expires_at is None:
        return ""
    left = form.expires_at - now
    if left <= 0:
        return FORM_EXPIRED
    minutes = math.ceil(left / 60)  # "within 60 minutes" for an hour's form read a moment after it opened
    if minutes <= 120:
        return FORM_EXPIRES_MINUTES.format(minutes=minutes)
    return FORM_EXPIRES_HOURS.format(hours=round(left / 3600))


def _content(form: HumanInputForm) -> str:
    """The form's text with each `{{#$output.name#}}` shown as the field it stands for."""
    return re.sub(r"\{\{#\$output\.(\w+)#\}\}", lambda m: f"`{m.group(1)}`", form.content).strip()


def _field_line(form: HumanInputForm, item: FormField) -> str:
    if item.is_file:
        return FORM_FIELD_FILE.format(name=item.name)
    if item.options:
        shown = ", ".join(f"{n}. {o}" for n, o in enumerate(item.options[:MAX_OPTIONS_SHOWN], 1))
        if len(item.options) > MAX_OPTIONS_SHOWN:
            return FORM_FIELD_SELECT_MANY.format(
                name=item.name, options=shown, more=len(item.options) - MAX_OPTIONS_SHOWN
            )
        return FORM_FIELD_SELECT.format(name=item.name, options=shown)
    default = form.default_of(item)
    if default:
        return FORM_FIELD_TEXT_DEFAULT.format(name=item.name, default=default)
    return FORM_FIELD_TEXT.format(name=item.name)


def _example(item: FormField) -> str:
    return "1" if item.options else "…"


# --- reading a reply ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The form answered with `action_id`; `awaiting` file fields still to be sent (then submitted)."""

    action_id: str
    inputs: Mapping[str, Any]
    awaiting: tuple[FormField, ...] = ()


@dataclass(frozen=True)
class Invalid:
    """A reply that chose an action but cannot be submitted as it is: what to fix."""

    reason: str


class NotAnAnswer:
    """A reply that does not start with one of the form's actions: a new question."""


NOT_AN_ANSWER = NotAnAnswer()
Reply = Answer | Invalid | NotAnAnswer


def read_reply(form: HumanInputForm, text: str) -> Reply:
    """What a person's reply means for their pending form."""
    chosen = choose_action(form.actions, text)
    if chosen is None:
        return NOT_AN_ANSWER
    action, rest = chosen
    return answer(form, action.id, _values_from(form, rest))


def choose_action(actions: Sequence[FormAction], text: str) -> tuple[FormAction, str] | None:
    """The action a reply starts with, by number, title or id (case-insensitive), and the rest of the reply."""
    text = text.strip()
    number = re.match(r"(\d{1,3})(?=$|[\s:：,，.。)）-])", text)
    if number is not None:
        index = int(number.group(1)) - 1
        if 0 <= index < len(actions):
            return actions[index], text[number.end() :].lstrip(_SEPARATORS)
        return None
    folded = text.casefold()
    names = sorted(((a.title, a) for a in actions), key=lambda pair: -len(pair[0]))
    names += sorted(((a.id, a) for a in actions), key=lambda pair: -len(pair[0]))
    for name, action in names:
        key = name.casefold()
        if folded.startswith(key) and (len(text) == len(key) or text[len(key)] in _SEPARATORS + "\n"):
            return action, text[len(key) :].lstrip(_SEPARATORS)
    return None


def _values_from(form: HumanInputForm, rest: str) -> dict[str, str] | Invalid:
    """The field values a reply's rest gives: all of it for a single field, else `name: value` lines."""
    typed = [f for f in form.fields if not f.is_file]
    if not rest.strip() or not typed:
        return {}
    if len(typed) == 1:
        only = typed[0].name
        labelled = re.match(rf"\s*{re.escape(only)}\s*[:：]\s?", rest, re.IGNORECASE)  # `comment: …` works too
        return {only: rest[labelled.end() :].strip() if labelled else rest.strip()}
    by_name = {f.name.casefold(): f.name for f in typed}
    values: dict[str, str] = {}
    current: str | None = None
    for line in rest.splitlines():
        labelled = re.match(r"\s*([\w.-]+)\s*[:：]\s?(.*)$", line)
        if labelled is not None and labelled.group(1).casefold() in by_name:
            current = by_name[labelled.group(1).casefold()]
            values[current] = labelled.group(2).strip()
        elif labelled is not None and current is None:
            return Invalid(INVALID_UNKNOWN_FIELD.format(name=labelled.group(1), names=_names(typed)))
        elif current is not None:
            values[current] = f"{values[current]}\n{line}".strip()
        elif line.strip():
            return Invalid(INVALID_NO_FIELD_NAME.format(names=_names(typed)))
    return values


def answer(form: HumanInputForm, action_id: str, values: Mapping[str, Any] | Invalid) -> Answer | Invalid:
    """The submission for `action_id` with `values` for some fields: every field present (its default, or
    empty, when not given; a select's option resolved), file fields awaited. Where a button answers too."""
    if isinstance(values, Invalid):
        return values
    inputs: dict[str, Any] = {}
    awaiting: list[FormField] = []
    for item in form.fields:
        given = values.get(item.name)
        if item.is_file:
            if given:
                inputs[item.name] = given
            else:
                awaiting.append(item)
            continue
        if item.options:
            chosen = _option(item, str(given) if given is not None else form.default_of(item))
            if isinstance(chosen, Invalid):
                return chosen
            inputs[item.name] = chosen
            continue
        text = str(given).strip() if given is not None else ""
        inputs[item.name] = text or form.default_of(item)
    return Answer(action_id, inputs, tuple(awaiting))


def _option(item: FormField, given: str) -> str | Invalid:
    given = given.strip()
    count = len(item.options)
    if not given:
        return Invalid(INVALID_NO_OPTION.format(name=item.name, count=count))
    if given.isdigit() and 1 <= int(given) <= count:
        return item.options[int(given) - 1]
    for option in item.options:
        if option.casefold() == given.casefold():
            return option
    return Invalid(INVALID_OPTION.format(value=given[:40], name=item.name, count=count))


def accepts(item: FormField, dify_type: str, extension: str) -> bool:
    """Whether a file of this kind may go into `item` (no types declared: anything)."""
    if not item.file_types:
        return True
    if "custom" in item.file_types and extension in item.file_extensions:
        return True
    return dify_type != "custom" and dify_type in item.file_types


def kinds_of(item: FormField) -> str:
    return ", ".join(_FILE_KINDS.get(t, t) for t in item.file_types) or "files"


def _names(fields: Sequence[FormField]) -> str:
    return ", ".join(f"`{f.name}`" for f in fields)
