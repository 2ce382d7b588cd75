"""The pure rules behind rich conversations: access lists, commands, progress lines, suggested questions,
Dify input mapping, the app-type verdict, and the /parameters cache."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dingdifyd.bridge.access import AccessPolicy
from dingdifyd.bridge.apps import ParametersCache
from dingdifyd.bridge.commands import help_text, parse_command
from dingdifyd.bridge.inputs import AppParameters, context_inputs, input_gaps, text_input_variable
from dingdifyd.bridge.progress import progress_line, with_suggestions
from dingdifyd.bridge.running import STOPPED, stopped_text
from dingdifyd.config import DIFY_CONTEXT_INPUTS
from dingdifyd.dify.apptype import AppTypeReport
from dingdifyd.dify.events import AgentThought, NodeStarted, TextDelta
from dingdifyd.errors import DifyUnavailable
from dingdifyd.models import GROUP_CHAT, SINGLE_CHAT, IncomingMessage
from tests.support.clock import FakeClock

pytestmark = pytest.mark.timeout(10)


def message(*, group: bool = False, staff: str = "u1", conversation: str = "cid1", title: str = "") -> IncomingMessage:
    return IncomingMessage(
        robot_code="dingrobot", msg_id="m1", msg_type="text", text="hi", conversation_id=conversation,
        conversation_type=GROUP_CHAT if group else SINGLE_CHAT, sender_id=f"$enc-{staff}", sender_staff_id=staff,
        sender_nick="Zhang San", conversation_title=title,
    )  # fmt: skip


# --- access ---------------------------------------------------------------------------------------------------


def test_no_lists_let_everyone_in():
    policy = AccessPolicy()
    assert policy.refusal(message()) is None
    assert policy.refusal(message(group=True)) is None


def test_allow_users_limits_one_to_one_and_groups_without_allow_groups():
    policy = AccessPolicy(allow_users=frozenset({"boss"}))
    assert policy.refusal(message(staff="boss")) is None
    assert policy.refusal(message(staff="intern")) == "sender not in allow_users"
    assert policy.refusal(message(staff="intern", group=True)) == "sender not in allow_users"
    assert policy.refusal(message(staff="boss", group=True)) is None


def test_an_allowed_group_is_open_to_all_its_members_and_others_are_closed():
    policy = AccessPolicy(allow_users=frozenset({"boss"}), allow_groups=frozenset({"cidTEAM"}))
    assert policy.refusal(message(staff="intern", group=True, conversation="cidTEAM")) is None
    assert policy.refusal(message(staff="boss", group=True, conversation="cidOTHER")) == "group not in allow_groups"
    assert policy.refusal(message(staff="intern")) == "sender not in allow_users"  # 1:1 still by allow_users


def test_deny_lists_win_and_match_the_encrypted_sender_id_too():
    policy = AccessPolicy(
        allow_groups=frozenset({"cidTEAM"}), deny_users=frozenset({"$enc-troll"}), deny_groups=frozenset({"cidX"})
    )
    assert policy.refusal(message(staff="troll", group=True, conversation="cidTEAM")) == "sender in deny_users"
    assert policy.refusal(message(group=True, conversation="cidX")) == "group in deny_groups"
    assert policy.refusal(message()) is None  # allow_groups says nothing about 1:1 chats


# --- commands -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prefix", "expected"),
    [
        ("/new", "/", ("new", "")),
        ("  /STOP now ", "/", ("stop", "now")),
        ("!help", "!", ("help", "")),
        ("/", "/", None),
        ("hello /new", "/", None),
        ("/new", "!", None),
    ],
)
def test_parse_command(text, prefix, expected):
    command = parse_command(text, prefix)
    assert (None if command is None else (command.name, command.argument)) == expected


def test_help_names_every_command_with_the_prefix():
    text = help_text("!")
    assert "`!new`" in text and "`!stop`" in text and "`!help`" in text


# --- progress and suggestions ---------------------------------------------------------------------------------


def test_progress_lines_for_tools_and_informative_nodes_only():
    assert progress_line(AgentThought(event="agent_thought", tool="current_time")) == "🔧 Using current_time…"
    assert progress_line(AgentThought(event="agent_thought", tool="a;b")) == "🔧 Using a, b…"
    assert progress_line(AgentThought(event="agent_thought", thought="hmm")) is None
    assert progress_line(NodeStarted(event="node_started", title="Search docs", node_type="knowledge-retrieval")) == (
        "⏳ Search docs…"
    )
    for quiet in ("start", "end", "answer"):
        assert progress_line(NodeStarted(event="node_started", title="Start", node_type=quiet)) is None
    assert progress_line(TextDelta(event="message", text="x")) is None
    long = progress_line(NodeStarted(event="node_started", title="x" * 200, node_type="llm"))
    assert long is not None and len(long) < 70


def test_suggestions_follow_the_answer_at_most_three():
    text = with_suggestions("The answer.", ["One?", "Two?", " ", "Three?", "Four?"])
    assert text.startswith("The answer.\n\n---\n")
    assert "- One?\n- Two?\n- Three?" in text and "Four" not in text
    assert with_suggestions("The answer.", []) == "The answer."
    assert with_suggestions("", ["One?"]) == ""


def test_stopped_text_keeps_the_partial_answer():
    assert stopped_text("Half an ans") == f"Half an ans\n\n{STOPPED}"
    assert stopped_text("  ") == STOPPED
    assert "Stopped." in STOPPED


# --- inputs ---------------------------------------------------------------------------------------------------


def params(*fields: tuple[str, str, dict[str, Any]], suggested: bool = False) -> AppParameters:
    form = [{kind: {"variable": name, "label": name, **spec}} for kind, name, spec in fields]
    return AppParameters.parse({"user_input_form": form, "suggested_questions_after_answer": {"enabled": suggested}})


def test_parameters_parse_the_form_and_the_suggestions_switch():
    parsed = params(("select", "lang", {"options": ["en", "zh"], "required": True}), suggested=True)
    assert parsed.suggested_after_answer
    field = parsed.field("lang")
    assert field is not None and field.kind == "select" and field.required and field.options == ("en", "zh")
    assert AppParameters.parse({"user_input_form": "garbage"}) == AppParameters()


@pytest.mark.parametrize(
    ("fields", "explicit", "expected"),
    [
        ((), "question", "question"),  # the config wins
        ((("text-input", "query", {}), ("paragraph", "other", {})), None, "query"),
        ((("paragraph", "question", {}),), None, "question"),  # the single text input
        ((("text-input", "sys_user_id", {}), ("paragraph", "question", {})), None, "question"),  # context aside
        ((("text-input", "a", {}), ("text-input", "b", {"required": True})), None, "b"),  # the required one
        ((("text-input", "a", {}), ("text-input", "b", {})), None, "query"),  # ambiguous: doctor says so
    ],
)
def test_text_input_variable(fields, explicit, expected):
    assert text_input_variable(params(*fields), explicit, DIFY_CONTEXT_INPUTS) == expected


def test_context_inputs_only_what_the_app_declares_fitted_to_it():
    form = params(
        ("text-input", "sys_user_id", {"max_length": 3}),
        ("select", "sys_chat_type", {"options": ["group"]}),
        ("number", "sys_user_nick", {}),
        ("paragraph", "sys_chat_title", {}),
    )
    one_to_one = context_inputs(message(staff="staff42"), DIFY_CONTEXT_INPUTS, form)
    assert one_to_one == {"sys_user_id": "sta"}  # cut to max_length; "single" is not an option; no title
    in_group = context_inputs(message(group=True, title="Team"), DIFY_CONTEXT_INPUTS, form)
    assert in_group == {"sys_user_id": "u1", "sys_chat_type": "group", "sys_chat_title": "Team"}
    # form unknown: everything mapped goes (Dify ignores what the app does not declare)
    unknown = context_inputs(message(), {"nick": "who"}, None)
    assert unknown == {"who": "Zhang San"}


def test_input_gaps_name_what_a_message_cannot_fill():
    form = params(
        ("paragraph", "question", {"required": True}),
        ("select", "lang", {"options": ["en"], "required": True}),
        ("file", "doc", {"required": True}),
        ("text-input", "sys_chat_title", {"required": True}),
        ("text-input", "note", {}),
    )
    gaps = {gap.field.variable: gap for gap in input_gaps(form, "workflow", "question", DIFY_CONTEXT_INPUTS)}
    assert set(gaps) == {"lang", "doc", "sys_chat_title"}
    assert gaps["lang"].blocking
    assert not gaps["doc"].blocking and not gaps["sys_chat_title"].blocking
    # in a chat app the message is the query: a required text input is a gap there
    assert "question" in {g.field.variable for g in input_gaps(form, "chatbot", "query", DIFY_CONTEXT_INPUTS)}


# --- app type verdict -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "actual", "matches"),
    [
        ("chatbot", "workflow", False),
        ("workflow", "completion", False),
        ("agent", "chatflow", True),  # the same API for the bridge
        ("auto", "workflow", True),
        ("completion", None, True),  # an older Dify confirmed the family only
    ],
)
def test_app_type_verdict(configured, actual, matches):
    report = AppTypeReport(configured=configured, actual=actual, mode=None, app_name="x")
    assert report.matches is matches


# --- the /parameters cache ------------------------------------------------------------------------------------


async def test_parameters_are_fetched_once_per_ttl_and_a_failure_keeps_the_last_good_answer():
    clock = FakeClock()
    answers: list[Any] = [{"suggested_questions_after_answer": {"enabled": True}}, DifyUnavailable("down")]
    fetched = 0

    async def fetch() -> dict[str, Any]:
        nonlocal fetched
        fetched += 1
        await asyncio.sleep(0)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = ParametersCache(fetch, ttl=300, retry_after=30, clock=clock)
    first, second = await asyncio.gather(cache.get(), cache.get())  # concurrent callers share one fetch
    assert fetched == 1 and first is second and first is not None and first.suggested_after_answer
    clock.now = 301
    assert (await cache.get()) is first  # the refresh failed: the last good answer stays
    assert fetched == 2
    clock.now = 320
    assert (await cache.get()) is first and fetched == 2  # not asked again before retry_after
