"""Rich conversations end to end, through the real SDK and the simulators: progress in the card, suggested
questions, /new /stop /help, access lists, session scope, per-chat routes, `auto` app type and its start-up
check, and DingTalk context in the Dify inputs. Nothing of ours is mocked. Against a Dify 0.15.3 and a 1.16.1."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from dingdifyd import config
from dingdifyd.errors import ConfigError
from dingdifyd.simulator.dify import DIFY_0_15, FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeCard
from dingdifyd.worker.runtime import BotRuntime
from tests.integration.harness import CLIENT_ID, ask, bot_entry, dify_key, echo, push, running_bot, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dify(any_dify):
    """Each test of this module against each Dify version."""
    return any_dify


# the fake model's silence before its first text: long enough for the step line to show (after 0.5 s)
PROGRESS_LATENCY = 1.0


def first_index(card: FakeCard, predicate) -> int:
    return next(i for i, content in enumerate(card.contents) if predicate(content))


# --- progress -------------------------------------------------------------------------------------------------


async def test_an_agent_tool_call_shows_in_the_card_until_the_answer_replaces_it(tmp_path, dingtalk, dify):
    dify.configure(dify_key("agent"), agent_tool="current_time", first_token_delay=PROGRESS_LATENCY)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type="agent")])):
        card = await ask(dingtalk, "what time is it")
    assert "🔧 Using current_time…" in card.contents
    progress = card.contents.index("🔧 Using current_time…")
    assert progress < first_index(card, lambda c: c.startswith("Tool said:"))
    assert card.final_content.startswith("Tool said:")
    assert "🔧" not in card.final_content


@pytest.mark.parametrize("app_type", ["workflow", "chatflow"])
async def test_workflow_steps_show_in_the_card_before_the_answer(tmp_path, dingtalk, dify, app_type):
    dify.configure(dify_key(app_type), first_token_delay=PROGRESS_LATENCY)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type=app_type)])):
        card = await ask(dingtalk, "steps please")
    assert "⏳ LLM…" in card.contents
    assert card.contents.index("⏳ LLM…") < first_index(card, lambda c: c.startswith("Echo"))
    assert not any(c.startswith("⏳ Start") for c in card.contents)  # every run has one: not worth showing
    assert card.final_content == echo("steps please", dify)


async def test_progress_can_be_switched_off(tmp_path, dingtalk, dify):
    dify.configure(dify_key("workflow"), first_token_delay=PROGRESS_LATENCY)
    bots = [bot_entry(app_type="workflow", show_progress=False)]
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)):
        card = await ask(dingtalk, "quietly")
    assert not any(c.startswith("⏳") for c in card.contents)
    assert card.final_content == echo("quietly", dify)


# --- suggested questions --------------------------------------------------------------------------------------


async def test_suggested_questions_follow_the_answer_when_the_app_offers_them(tmp_path, dingtalk, dify):
    dify.enable_suggested_questions(dify_key("chatbot"), ["What else can you do?", "Why?"])
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await ask(dingtalk, "hello", sender_staff_id="u7")
    assert card.final_content.startswith(echo("hello", dify) + "\n\n---\n")
    assert "- What else can you do?\n- Why?" in card.final_content
    (request,) = dify.requests_to("/suggested")
    assert request.query["user"] == "dingtalk:dingcorp001:u7"  # the answer's own user: Dify checks it


async def test_no_suggestions_asked_when_the_app_has_them_off_or_the_config_says_so(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        plain = await ask(dingtalk, "one")
    dify.enable_suggested_questions(dify_key("chatbot"), ["Next?"])
    config_off = write_config(tmp_path / "off.yaml", dingtalk, dify, show_suggested_questions=False)
    async with running_bot(config_off):
        off = await ask(dingtalk, "two")
    assert plain.final_content == echo("one", dify)
    assert off.final_content == echo("two", dify)
    assert dify.requests_to("/suggested") == []


async def test_slow_suggestions_never_hold_the_final_answer_long(tmp_path, dingtalk, dify):
    dify.enable_suggested_questions(dify_key("chatbot"), ["Too late?"], delay=30)
    config_file = write_config(tmp_path / "c.yaml", dingtalk, dify, suggested_questions_timeout=0.2)
    async with running_bot(config_file):
        card = await ask(dingtalk, "quick")
    assert card.final_content == echo("quick", dify)
    assert len(dify.requests_to("/suggested")) == 1


# --- commands -------------------------------------------------------------------------------------------------


async def test_stop_ends_the_running_answer_and_stops_its_dify_task(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.3)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        running = push(dingtalk, "tell me a long story", sender_staff_id="u1")
        await dingtalk.wait_for(lambda: running in dingtalk.cards and dingtalk.cards[running].contents, 10, "text")
        stop_card = await ask(dingtalk, "/stop", sender_staff_id="u1")
        stopped = await dingtalk.wait_card_final(running, timeout=10)
    assert stopped.final_content.startswith("Echo:")
    assert stopped.final_content.endswith("⏹️ Stopped.")
    assert not stopped.failed
    assert dify.answer_tail not in stopped.final_content  # it did not run to its end
    assert "Stopped the answer" in stop_card.final_content
    (stop,) = [stop for stop in dify.stops if stop.found]  # the others: the start-up check's harmless probe
    assert stop.user == "dingtalk:dingcorp001:u1"


async def test_stop_ends_an_answer_even_while_dify_is_silent(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), first_token_delay=30)  # nothing at all for half a minute
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        running = push(dingtalk, "think hard", sender_staff_id="u1")
        await dingtalk.wait_for(lambda: dify.running_task_ids, 10, "the Dify run to start")
        await ask(dingtalk, "/stop", sender_staff_id="u1")
        stopped = await dingtalk.wait_card_final(running, timeout=10)
    assert stopped.final_content == "⏹️ Stopped."


async def test_stop_with_nothing_running_says_so_and_touches_only_the_own_session(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.15)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        other = push(dingtalk, "someone else's question", sender_staff_id="u2")
        nothing = await ask(dingtalk, "/STOP", sender_staff_id="u1")
        assert "nothing to stop" in nothing.final_content
        untouched = await dingtalk.wait_card_final(other, timeout=20)
    assert untouched.final_content == echo("someone else's question", dify)
    assert not any(stop.found for stop in dify.stops)


async def test_commands_are_not_held_up_by_a_running_answer(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.15)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        running = push(dingtalk, "a long answer", sender_staff_id="u1")
        helped = await ask(dingtalk, "/help", sender_staff_id="u1")
        assert not dingtalk.cards[running].done  # the help came while the answer was still being written
        await dingtalk.wait_card_final(running, timeout=20)
    assert "`/stop`" in helped.final_content


async def test_new_during_a_running_answer_is_not_undone_when_it_ends(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await ask(dingtalk, "first", sender_staff_id="u1")
        dify.configure(dify_key("chatbot"), token_delay=0.1)
        running = push(dingtalk, "second", sender_staff_id="u1")
        await dingtalk.wait_for(lambda: running in dingtalk.cards and dingtalk.cards[running].contents, 10, "text")
        await ask(dingtalk, "/new", sender_staff_id="u1")
        await dingtalk.wait_card_final(running, timeout=20)
        dify.configure(dify_key("chatbot"), token_delay=0.002)
        await ask(dingtalk, "third", sender_staff_id="u1")
    _, second, third = dify.requests_to("/chat-messages")
    assert "conversation_id" in second.json
    assert "conversation_id" not in third.json  # a fresh start, although "second" ended after /new


async def test_unknown_commands_go_to_dify_and_the_prefix_is_configurable(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, command_prefix="!")):
        helped = await ask(dingtalk, "!help")
        slash = await ask(dingtalk, "/help")
        unknown = await ask(dingtalk, "!summarize this")
    assert "`!new`" in helped.final_content
    assert slash.final_content == echo("/help", dify)
    assert unknown.final_content == echo("!summarize this", dify)


# --- access ---------------------------------------------------------------------------------------------------


async def test_allow_and_deny_lists_refuse_politely_through_the_webhook(tmp_path, dingtalk, dify):
    config_file = write_config(
        tmp_path / "c.yaml", dingtalk, dify, allow_users=["boss"], allow_groups=["cidTEAM=="], deny_users=["mole"],
        access_denied_reply="Not for you, sorry.",
    )  # fmt: skip
    async with running_bot(config_file):
        push(dingtalk, "let me in", sender_staff_id="intern")
        (refused,) = await dingtalk.wait_webhook_replies(1, timeout=10)
        allowed = await ask(dingtalk, "hi from the boss", sender_staff_id="boss")
        team = await ask(
            dingtalk, "hi from the team", sender_staff_id="intern", group=True, conversation_id="cidTEAM=="
        )
        push(dingtalk, "other group", sender_staff_id="boss", group=True, conversation_id="cidOTHER==")
        push(dingtalk, "sneaky", sender_staff_id="mole", group=True, conversation_id="cidTEAM==")
        replies = await dingtalk.wait_webhook_replies(3, timeout=10)
    assert refused.text == "Not for you, sorry."
    assert allowed.final_content == echo("hi from the boss", dify)
    assert team.final_content == echo("hi from the team", dify)
    assert [r.text for r in replies] == ["Not for you, sorry."] * 3
    assert replies[1].body["at"]["atUserIds"] == ["boss"]  # in a group the refusal names who it is for
    assert len(dingtalk.cards) == 2  # refusals cost no card
    assert {r.json["query"] for r in dify.requests_to("/chat-messages")} == {"hi from the boss", "hi from the team"}


async def test_an_empty_refusal_reply_refuses_silently(tmp_path, dingtalk, dify):
    config_file = write_config(tmp_path / "c.yaml", dingtalk, dify, deny_users=["mole"], access_denied_reply="")
    async with running_bot(config_file):
        push(dingtalk, "anyone there?", sender_staff_id="mole")
        await ask(dingtalk, "after", sender_staff_id="friend")  # handled in order: the refusal came first
    assert dingtalk.webhook_replies == []
    assert len(dingtalk.cards) == 1


# --- session scope and routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["user", "chat"])
async def test_group_session_scope(tmp_path, dingtalk, dify, scope):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, session_scope=scope)):
        await ask(dingtalk, "from one", sender_staff_id="u1", group=True, conversation_id="cidG==")
        await ask(dingtalk, "from two", sender_staff_id="u2", group=True, conversation_id="cidG==")
    first, second = dify.requests_to("/chat-messages")
    if scope == "chat":
        assert dify.conversations[second.json["conversation_id"]].queries == ["from one", "from two"]
        assert first.json["user"] == second.json["user"] == "dingtalk:dingcorp001:group:cidG=="
    else:
        assert "conversation_id" not in second.json
        assert first.json["user"] != second.json["user"]


async def test_a_routed_chat_uses_its_own_app_and_its_own_contexts(tmp_path, dingtalk, dify):
    route = {"name": "sales", "conversation_ids": ["cidSALES=="], "dify_app_type": "chatflow",
             "dify_app_api_key": dify_key("chatflow")}  # fmt: skip
    routed = write_config(tmp_path / "routed.yaml", dingtalk, dify, bots=[bot_entry(routes=[route])])
    async with running_bot(routed):
        await ask(dingtalk, "sales one", sender_staff_id="u1", group=True, conversation_id="cidSALES==")
        sales = await ask(dingtalk, "sales two", sender_staff_id="u1", group=True, conversation_id="cidSALES==")
        other = await ask(dingtalk, "elsewhere", sender_staff_id="u1", group=True, conversation_id="cidOTHER==")
    assert sales.final_content == echo("sales two", dify) and other.final_content == echo("elsewhere", dify)
    by_app = [(r.app, r.json["query"]) for r in dify.requests_to("/chat-messages")]
    assert by_app == [("fake-chatflow", "sales one"), ("fake-chatflow", "sales two"), ("fake-chatbot", "elsewhere")]
    # the same chat without the route: the chatbot app, and no conversation id of the chatflow app sent to it
    unrouted = write_config(tmp_path / "unrouted.yaml", dingtalk, dify)
    async with running_bot(unrouted):
        await ask(dingtalk, "sales three", sender_staff_id="u1", group=True, conversation_id="cidSALES==")
    last = dify.requests_to("/chat-messages")[-1]
    assert last.app == "fake-chatbot" and "conversation_id" not in last.json


# --- app type -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app_type", "path"),
    [("chatbot", "/chat-messages"), ("agent", "/chat-messages"), ("chatflow", "/chat-messages"),
     ("workflow", "/workflows/run"), ("completion", "/completion-messages")],
)  # fmt: skip
async def test_auto_app_type_is_asked_of_dify_for_each_mode(tmp_path, dingtalk, app_type, path):
    async with running_fake_dify_with_mode() as dify:
        bots = [bot_entry(app_type="auto", dify_key=dify_key(app_type))]
        async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)):
            card = await ask(dingtalk, "which am I")
        assert card.final_content == echo("which am I", dify)
        (request,) = [r for r in dify.requests if r.path.endswith(path) and r.json and "inputs" in r.json]
        assert request.app == f"fake-{app_type}"
        assert dify.requests_to("/info")


async def test_auto_app_type_on_a_dify_without_mode_in_info(tmp_path, dingtalk, dify):
    bots = [bot_entry(app_type="auto", dify_key=dify_key("workflow"))]
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)):
        card = await ask(dingtalk, "old dify")
    assert card.final_content == echo("old dify", dify)
    assert dify.requests_to("/workflows/run")[-1].json["inputs"]["query"] == "old dify"


@pytest.mark.parametrize("with_mode", [True, False])
async def test_a_key_of_another_kind_of_app_stops_the_bot_naming_the_key(tmp_path, dingtalk, with_mode):
    async with running_fake_dify_with_mode(with_mode) as dify:
        route = {"conversation_ids": ["cidX=="], "dify_app_type": "completion", "dify_app_api_key": dify_key("agent")}
        bots = [bot_entry(app_type="chatbot", dify_key=dify_key("workflow"), routes=[route])]
        loaded = config.load(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots), environ={})
        with pytest.raises(ConfigError) as caught:
            await BotRuntime(loaded.bot("helpdesk"), loaded).run()
    problems = "\n".join(caught.value.problems)
    assert "bots[0].dify_app_type: 'chatbot', but its key belongs to a workflow app" in problems
    assert "set dify_app_type: workflow" in problems
    assert "bots[0].routes[0].dify_app_type: 'completion'" in problems
    assert dingtalk.connections == 0  # it never took a message


async def test_the_bot_process_exits_78_on_a_wrong_app_type(tmp_path, dingtalk, dify):
    bots = [bot_entry(app_type="workflow", dify_key=dify_key("chatbot"))]
    config_file = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots, restart_delay_min=0.05)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd", "run", "-c", str(config_file),
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = stderr.decode()
    assert process.returncode == 78, log
    # 0.15.3 cannot say which chat kind the key is; 1.x names the mode
    kind = "chatbot app, mode chat" if dify.version != DIFY_0_15 else "chat-route app"
    assert f"bots[0].dify_app_type: 'workflow', but its key belongs to a {kind}" in log


# --- inputs ---------------------------------------------------------------------------------------------------


CONTEXT_FORM = [
    {"paragraph": {"label": "Question", "variable": "question", "required": True, "max_length": 200}},
    {"text-input": {"label": "Staff", "variable": "sys_user_id", "required": False, "max_length": 32}},
    {"text-input": {"label": "Asker", "variable": "asker", "required": False, "max_length": 32}},
    {"select": {"label": "Chat", "variable": "sys_chat_type", "required": False, "options": ["single", "group"]}},
    {"text-input": {"label": "Title", "variable": "sys_chat_title", "required": False, "max_length": 4}},
    {"text-input": {"label": "Robot", "variable": "sys_robot_code", "required": False, "max_length": 64}},
]


async def test_dingtalk_context_fills_the_inputs_the_app_declares(tmp_path, dingtalk, dify):
    dify.add_app("app-ctx", "workflow", name="ctx", user_input_form=CONTEXT_FORM, token_delay=0.002)
    bots = [bot_entry(app_type="workflow", dify_key="app-ctx", dify_inputs={"nick": "asker"})]
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)):
        card = await ask(
            dingtalk, "what is our plan", sender_staff_id="staff9", sender_nick="Li Si", group=True,
            conversation_id="cidPLAN==", conversation_title="Planning",
        )  # fmt: skip
    assert card.final_content == echo("what is our plan", dify)  # the single text input got the message
    (request,) = dify.requests_to("/workflows/run")
    assert request.json["inputs"] == {
        "question": "what is our plan",
        "sys_user_id": "staff9",
        "asker": "Li Si",  # the configured name
        "sys_chat_type": "group",
        "sys_chat_title": "Plan",  # cut to the variable's max_length: Dify would refuse it whole
        "sys_robot_code": CLIENT_ID,
    }


async def test_an_explicit_input_variable_wins_and_undeclared_context_is_not_sent(tmp_path, dingtalk, dify):
    form = [{"paragraph": {"label": "A", "variable": "a", "required": False}},
            {"paragraph": {"label": "B", "variable": "b", "required": False}}]  # fmt: skip
    dify.add_app("app-two", "completion", name="two", user_input_form=form, token_delay=0.002)
    bots = [bot_entry(app_type="completion", dify_key="app-two", dify_input_variable="b")]
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)):
        card = await ask(dingtalk, "to b please")
    assert card.final_content == echo("to b please", dify)
    (request,) = dify.requests_to("/completion-messages")
    assert request.json["inputs"] == {"b": "to b please"}


# --- helpers --------------------------------------------------------------------------------------------------


class running_fake_dify_with_mode:
    """A fake Dify whose /info names the app mode (late 1.x), or not (0.15.3)."""

    def __init__(self, with_mode: bool = True):
        self.with_mode = with_mode
        self.fake: FakeDify | None = None

    async def __aenter__(self) -> FakeDify:
        self.fake = await start_fake_dify(default_apps=True, info_with_mode=self.with_mode)
        for key in list(self.fake.apps):
            self.fake.configure(key, token_delay=0.002)
        return self.fake

    async def __aexit__(self, *exc: object) -> None:
        assert self.fake is not None
        await self.fake.close()
