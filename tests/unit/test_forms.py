"""How a human-input form is shown in a card and how a person's reply answers it. Pure."""

from __future__ import annotations

import pytest

from dingdifyd.bridge import forms
from dingdifyd.bridge.forms import Answer, Invalid, NotAnAnswer, PendingForm, read_reply, render_form
from dingdifyd.dify.forms import FormAction, FormField, HumanInputForm

NOW = 1_796_393_160.0
ACTIONS = (FormAction("approve", "Approve", "primary"), FormAction("reject", "Reject"))


def make(
    *fields: FormField, actions=ACTIONS, expires: float | None = NOW + 3600, token: str | None = "tok", **extra
) -> HumanInputForm:
    return HumanInputForm(
        form_id="f1", node_id="review", node_title="Review", content="Please review: deploy\n\nComment: "
        "{{#$output.comment#}}", fields=fields, actions=actions, token=token, expires_at=expires, **extra,
    )  # fmt: skip


COMMENT = FormField("comment", "paragraph")
SIZE = FormField("size", "select", options=("Small", "Medium", "Large"))
DOC = FormField("doc", "file", file_types=("document",))


def test_a_form_is_shown_with_its_fields_actions_and_time_left() -> None:
    assert render_form(make(COMMENT), NOW) == (
        "📝 **Review**\n\nPlease review: deploy\n\nComment: `comment`\n\n**To fill in:**\n- `comment`\n\n"
        "**Reply with the number or the name of your choice:**\n1. Approve\n2. Reject\n\n"
        "Write the `comment` after your choice, e.g. `1 …`.\n\n⏳ Please answer within 60 minutes."
    )


def test_several_fields_are_shown_with_how_to_write_them() -> None:
    text = render_form(make(COMMENT, SIZE, DOC, expires=NOW + 3 * 86400), NOW)
    assert "- `size`: one of 1. Small, 2. Medium, 3. Large" in text
    assert "- `doc`: a picture or file, sent after your answer" in text
    assert "Then one line per field, `name: value`, e.g.:\n```\n1\ncomment: …\nsize: 1\n```" in text
    assert text.endswith("⏳ Please answer within 72 hours.")


def test_a_default_is_shown_and_an_expired_form_says_so() -> None:
    text = render_form(make(FormField("comment", "paragraph", default="LGTM"), expires=NOW - 1), NOW)
    assert "- `comment` (if left out: LGTM)" in text
    assert text.endswith(forms.FORM_EXPIRED)
    assert "answer within" not in render_form(make(COMMENT, expires=None), NOW)


def test_a_huge_select_lists_a_few_options_and_says_how_many_more() -> None:
    big = FormField("choice", "select", options=tuple(f"Option {n}" for n in range(1, 201)))
    text = render_form(make(big), NOW)
    assert "20. Option 20 … and 180 more (reply with an option's number or text)" in text
    assert "Option 21" not in text
    assert len(text) < 1200


def test_a_form_only_the_console_can_answer_says_where() -> None:
    form = make(COMMENT, token=None, approval_channels=("console", "email"))
    assert forms.render_elsewhere(form) == (
        "📝 The app waits for “Review”, which cannot be answered here: it is handled in the Dify console or email."
    )


@pytest.mark.parametrize(
    ("reply", "action", "comment"),
    [
        ("1", "approve", ""), ("2", "reject", ""), ("1 ship it", "approve", "ship it"), ("1. ship it", "approve",
        "ship it"), ("1: ship it", "approve", "ship it"), ("2) no", "reject", "no"), ("Approve", "approve", ""),
        ("approve looks good", "approve", "looks good"), ("REJECT: too risky", "reject", "too risky"),
        ("reject\nline one\nline two", "reject", "line one\nline two"), ("1，好的", "approve", "好的"),
    ],
)  # fmt: skip
def test_a_reply_chooses_an_action_and_fills_the_one_field(reply: str, action: str, comment: str) -> None:
    assert read_reply(make(COMMENT), reply) == Answer(action, {"comment": comment})


@pytest.mark.parametrize(
    "reply", ["what time is it?", "3", "0", "12 monkeys", "approved", "Rejection letter", "", "2024 plans"]
)
def test_a_reply_that_does_not_start_with_an_action_is_not_an_answer(reply: str) -> None:
    assert isinstance(read_reply(make(COMMENT), reply), NotAnAnswer)


def test_a_field_left_out_gets_its_default() -> None:
    form = make(FormField("comment", "paragraph", default="no comment"))
    assert read_reply(form, "1") == Answer("approve", {"comment": "no comment"})
    resolved = make(COMMENT, defaults={"comment": "from a variable"})
    assert read_reply(resolved, "2") == Answer("reject", {"comment": "from a variable"})


def test_several_fields_are_read_from_name_value_lines() -> None:
    reply = read_reply(make(COMMENT, SIZE), "1\nsize: 3\ncomment: fine\nand more")
    assert reply == Answer("approve", {"comment": "fine\nand more", "size": "Large"})
    assert read_reply(make(COMMENT, SIZE), "2\nSIZE: medium") == Answer("reject", {"comment": "", "size": "Medium"})


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("1\nsize: 4", forms.INVALID_OPTION.format(value="4", name="size", count=3)),
        ("1\nsize: huge", forms.INVALID_OPTION.format(value="huge", name="size", count=3)),
        ("1", forms.INVALID_NO_OPTION.format(name="size", count=3)),
        ("1\ncolour: red", forms.INVALID_UNKNOWN_FIELD.format(name="colour", names="`comment`, `size`")),
        ("1 just text", forms.INVALID_NO_FIELD_NAME.format(names="`comment`, `size`")),
    ],
)
def test_a_reply_that_cannot_be_submitted_says_what_to_fix(reply: str, reason: str) -> None:
    assert read_reply(make(COMMENT, SIZE), reply) == Invalid(reason)


def test_a_single_select_takes_the_option_after_the_action() -> None:
    assert read_reply(make(SIZE), "1 2") == Answer("approve", {"size": "Medium"})
    assert read_reply(make(SIZE), "Approve small") == Answer("approve", {"size": "Small"})


def test_a_file_field_waits_for_the_file() -> None:
    reply = read_reply(make(COMMENT, DOC), "1\ncomment: see attached")
    assert reply == Answer("approve", {"comment": "see attached"}, awaiting=(DOC,))
    file_value = {"type": "document", "transfer_method": "local_file", "upload_file_id": "u1"}
    done = forms.answer(make(COMMENT, DOC), "approve", {"comment": "see attached", "doc": file_value})
    assert done == Answer("approve", {"comment": "see attached", "doc": file_value})


def test_a_button_answers_through_the_same_entry_point() -> None:
    """What the interactive card's buttons will call: an action id and the field values."""
    assert forms.answer(make(COMMENT, SIZE), "reject", {"size": "1"}) == Answer(
        "reject", {"comment": "", "size": "Small"}
    )


def test_which_files_a_field_takes() -> None:
    assert forms.accepts(DOC, "document", "pdf") and not forms.accepts(DOC, "image", "png")
    assert forms.accepts(FormField("any", "file"), "video", "mp4")
    custom = FormField("x", "file", file_types=("custom",), file_extensions=("dwg",))
    assert forms.accepts(custom, "custom", "dwg") and not forms.accepts(custom, "custom", "exe")
    assert forms.kinds_of(FormField("p", "file-list", file_types=("image", "document"))) == "pictures, documents"


def pending(**changes) -> PendingForm:
    values = dict(form=make(COMMENT, SIZE), app="helpdesk", workflow_run_id="run-1", task_id="task-1",
                  dify_user="dingtalk:corp:ada", asker="ada", asker_name="Ada", created_at=NOW)  # fmt: skip
    return PendingForm(**{**values, **changes})


def test_a_pending_form_survives_the_store_and_is_kept_a_day_past_its_expiry() -> None:
    waiting = pending(action_id="approve", inputs={"comment": "x"})
    assert PendingForm.from_dict(waiting.to_dict()) == waiting
    assert waiting.forget_at() == NOW + 3600 + forms.LATE_ANSWER_GRACE
    assert pending(form=make(COMMENT, expires=None)).forget_at() == NOW + forms.NO_EXPIRY_KEEP
    assert waiting.expired(NOW + 3601) and not waiting.expired(NOW)


@pytest.mark.parametrize("record", [{}, {"form": "x"}, {"form": {}, "app": "a"}, {"form": None}])
def test_an_unreadable_pending_form_is_none(record) -> None:
    assert PendingForm.from_dict(record) is None
