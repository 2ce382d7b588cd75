"""Human-input forms answered from DingTalk (Dify 1.x: 0.15.3 has no Human Input node), end to end: the run
pauses, the person who asked sees the form, answers by replying, and the rest of the answer streams into the card
of their reply. Only the asker answers; a message that is not an answer is a new question; expired, answered,
vanished and refused forms each get a clear reply; forms survive restarts; nothing hangs."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from dingdifyd.bridge import forms
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator.dify import (
    DIFY_1_16,
    FakeDify,
    HumanInputNode,
    action,
    file_input,
    paragraph,
    select,
    start_fake_dify,
)
from dingdifyd.simulator.dingtalk import FakeCard, FakeDingTalk
from dingdifyd.store.disk import DiskStore
from tests.integration.harness import bot_entry, deliver, echo, running_bot, write_config

pytestmark = pytest.mark.timeout(60)

KEYS = {"chatflow": "app-hitl-chatflow", "workflow": "app-hitl-workflow"}
USER = "dingtalk:dingcorp001:asker1"


@pytest.fixture
async def dify():
    fake = await start_fake_dify(version=DIFY_1_16)
    fake.add_app(KEYS["chatflow"], "advanced-chat", name="hitl-chatflow", human_input=HumanInputNode(),
                 user_input_form=[], token_delay=0.002)  # fmt: skip
    form = [{"text-input": {"label": "query", "variable": "query", "required": True, "max_length": 256}}]
    fake.add_app(KEYS["workflow"], "workflow", name="hitl-workflow", human_input=HumanInputNode(),
                 user_input_form=form, token_delay=0.002)  # fmt: skip
    yield fake
    await fake.close()


def config_for(tmp_path, dingtalk: FakeDingTalk, dify: FakeDify, app_type: str, key: str | None = None, **top: Any):
    bots = [bot_entry(app_type=app_type, dify_key=key or KEYS[app_type])]
    return write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots, **top)


async def say(dingtalk: FakeDingTalk, text: str, *, who: str = "asker1", nick: str = "Ada", **kwargs: Any) -> FakeCard:
    """A person writes to the robot; their message's card, once final."""
    data = dingtalk.make_text_message(text, sender_staff_id=who, sender_nick=nick, **kwargs)
    return await deliver(dingtalk, data)


@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
async def test_the_asker_sees_the_form_and_answers_it_by_replying(tmp_path, dingtalk, dify, app_type):
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        paused = await say(dingtalk, "may I deploy v2?")
        answered = await say(dingtalk, "1 go ahead")
    assert not paused.failed
    assert paused.final_content.startswith(
        "📝 **Review**\n\nPlease review: may I deploy v2?\n\nComment: `comment`\n\n**To fill in:**\n- `comment`\n\n"
        "**Reply with the number or the name of your choice:**\n1. Approve\n2. Reject\n\n"
        "Write the `comment` after your choice, e.g. `1 …`."
    )
    assert paused.final_content.endswith("\n\n⏳ Please answer within 60 minutes.")
    assert not answered.failed
    if app_type == "chatflow":
        assert answered.final_content == "Decision: Approve (approve), comment: go ahead, query: may I deploy v2?"
    else:  # 1.16.1 ends the resumed workflow "stopped", outputs {}: the answer comes from its run record
        assert answered.final_content == "approve\n\nApprove\n\ngo ahead\n\nmay I deploy v2?"
    assert dify.form_submissions == [
        {"token": the_form_token(dify), "action": "approve", "inputs": {"comment": "go ahead"}, "user": USER}
    ]
    paths = [r.path for r in dify.requests]
    subscribed = next(i for i, p in enumerate(paths) if p.endswith("/events"))
    submitted = next(i for i, (p, r) in enumerate(zip(paths, dify.requests, strict=True))
                     if p.startswith("/v1/form/") and r.method == "POST")  # fmt: skip
    assert subscribed < submitted  # listening before answering: Dify keeps no events
    (events,) = [r for r in dify.requests if r.path.endswith("/events")]
    assert events.query == {"user": USER}


def the_form_token(dify: FakeDify) -> str:
    (token,) = [t for t, f in dify.forms.items() if f.token]
    return token


async def test_a_workflow_without_the_defect_streams_its_resumed_answer(tmp_path, dingtalk, dify):
    dify.configure(KEYS["workflow"], resume_bug=False)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "workflow")):
        await say(dingtalk, "ship it?")
        answered = await say(dingtalk, "Reject not today")
    assert answered.final_content == "reject<br>Reject<br>not today<br>ship it?"  # (line breaks, as DingTalk shows)
    assert dify.form_submissions[0]["action"] == "reject"


async def test_a_message_that_is_not_an_answer_is_a_new_question_and_the_form_waits(tmp_path, dingtalk, dify):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "may I deploy?")
        other = await say(dingtalk, "what time is it?")
        answered = await say(dingtalk, "approve")
    assert other.final_content.startswith("📝 **Review**\n\nPlease review: what time is it?")  # it paused again
    assert dify.form_submissions[0]["action"] == "approve"
    assert len(dify.form_submissions) == 1
    assert answered.final_content == "Decision: Approve (approve), comment: , query: what time is it?"


async def test_a_new_question_while_a_form_waits_gets_a_hint(tmp_path, dingtalk, dify):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "may I?")
        dify.apps[KEYS["chatflow"]].human_input = None  # the app's next run answers without a form
        card = await say(dingtalk, "hello again")
        answered = await say(dingtalk, "1 yes")  # the form still waited
    hint = forms.STILL_PENDING.format(title="Review")
    assert card.final_content == f"{echo('hello again', dify)}\n\n{hint}"
    assert answered.final_content == "Decision: Approve (approve), comment: yes, query: may I?"


async def test_in_a_group_only_the_asker_answers(tmp_path, dingtalk, dify):
    group = {"group": True, "conversation_id": "cidTEAM=="}
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "may the team deploy?", **group)
        other = await say(dingtalk, "1 sure", who="bob", nick="Bob", **group)
        answered = await say(dingtalk, "2 not now", **group)
    assert other.final_content == forms.ONLY_ASKER.format(asker="Ada", title="Review")
    assert dify.form_submissions[0]["user"] == USER and dify.form_submissions[0]["action"] == "reject"
    assert answered.final_content.startswith("Decision: Reject (reject), comment: not now")


async def test_an_expired_form_is_told_so_and_forgotten(tmp_path, dingtalk, dify):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "deploy?")
        dify.expire_form(the_form_token(dify))
        late = await say(dingtalk, "1 yes")
        after = await say(dingtalk, "1 yes")  # forgotten: a new question now
    assert late.final_content == forms.ANSWER_EXPIRED.format(title="Review")
    assert dify.form_submissions == []
    assert after.final_content.startswith("📝 **Review**\n\nPlease review: 1 yes")


async def test_a_form_answered_elsewhere_is_told_so(tmp_path, dingtalk, dify, session: aiohttp.ClientSession):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "deploy?")
        body = {"inputs": {"comment": "by bob"}, "action": "approve", "user": "bob"}
        async with session.post(f"{dify.base_url}/form/human_input/{the_form_token(dify)}", json=body,
                                headers={"Authorization": f"Bearer {KEYS['chatflow']}"}) as response:  # fmt: skip
            assert response.status == 200
        late = await say(dingtalk, "2 no")
    assert late.final_content == forms.ANSWER_TOO_LATE.format(title="Review")
    assert [s["user"] for s in dify.form_submissions] == ["bob"]


async def test_a_form_that_vanished_is_told_so(tmp_path, dingtalk, dify):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "deploy?")
        dify.forms.pop(the_form_token(dify))  # e.g. the app was re-published, the run deleted
        gone = await say(dingtalk, "1")
    assert gone.final_content == forms.ANSWER_GONE.format(title="Review")


async def test_an_action_dify_does_not_know_gets_its_reason_and_the_form_waits(tmp_path, dingtalk, dify):
    config = config_for(tmp_path, dingtalk, dify, "chatflow")
    async with running_bot(config):
        await say(dingtalk, "deploy?")
    # the form as this bot kept it offers an action the node no longer has (the app changed meanwhile)
    store = DiskStore(tmp_path / "state" / "helpdesk")
    ((chat, records),) = [(c, f) for c in [f"helpdesk|{conversation(dingtalk)}"] if (f := store.forms_in_chat(c))]
    (person, record), = records.items()
    record["form"]["actions"].append({"id": "maybe", "title": "Maybe", "style": "default"})
    store.save_form(chat, person, record, 4102444800.0)
    store.close()
    async with running_bot(config):
        refused = await say(dingtalk, "3")
        answered = await say(dingtalk, "1 fine")
    assert refused.final_content == forms.ANSWER_REFUSED.format(title="Review", reason="Invalid action: maybe")
    assert answered.final_content.startswith("Decision: Approve (approve), comment: fine")


def conversation(dingtalk: FakeDingTalk) -> str:
    """The 1:1 conversation id the fake DingTalk gives the asker's messages."""
    message = parse_incoming(dingtalk.make_text_message("x", sender_staff_id="asker1"))
    assert message is not None
    return message.conversation_id


async def test_pending_forms_survive_a_restart(tmp_path, dingtalk, dify):
    config = config_for(tmp_path, dingtalk, dify, "chatflow")
    async with running_bot(config):
        await say(dingtalk, "before the restart?")
    async with running_bot(config):
        answered = await say(dingtalk, "1 after it")
    assert answered.final_content == "Decision: Approve (approve), comment: after it, query: before the restart?"


async def test_a_form_without_a_token_says_where_it_is_answered(tmp_path, dingtalk, dify):
    dify.add_app("app-console-only", "advanced-chat", human_input=HumanInputNode(webapp=False), user_input_form=[])
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow", "app-console-only")):
        card = await say(dingtalk, "approve me")
        later = await say(dingtalk, "1")  # nothing is pending here: a new question
    assert card.final_content == forms.FORM_ELSEWHERE.format(title="Review", channels="the Dify console")
    assert dify.form_submissions == []
    assert later.final_content == card.final_content.replace("approve me", "1")


async def test_a_malformed_form_gets_a_clear_word_and_nothing_hangs(tmp_path, dingtalk, dify):
    dify.add_app("app-broken-form", "advanced-chat", human_input=HumanInputNode(actions=()), user_input_form=[])
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow", "app-broken-form")):
        card = await say(dingtalk, "what now?")
    assert card.final_content == forms.FORM_UNAVAILABLE.format(title="Form")
    assert not card.failed


async def test_a_select_of_200_options_is_shown_short_and_answered_by_number(tmp_path, dingtalk, dify):
    options = [f"Option {n}" for n in range(1, 201)]
    node = HumanInputNode(inputs=(select("choice", options), paragraph("comment")))
    dify.add_app("app-big-select", "advanced-chat", human_input=node, user_input_form=[], token_delay=0.002)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow", "app-big-select")):
        card = await say(dingtalk, "pick one")
        invalid = await say(dingtalk, "1\nchoice: 201")
        answered = await say(dingtalk, "1\nchoice: 150\ncomment: the best one")
    assert "20. Option 20 … and 180 more" in card.final_content
    assert "Option 21," not in card.final_content
    assert invalid.final_content.startswith(forms.INVALID_OPTION.format(value="201", name="choice", count=200))
    assert dify.form_submissions[0]["inputs"] == {"choice": "Option 150", "comment": "the best one"}
    assert answered.final_content.startswith("Decision: Approve (approve), choice: Option 150, comment: the best one")


async def test_a_file_field_takes_the_picture_sent_next(tmp_path, dingtalk, dify):
    node = HumanInputNode(inputs=(file_input("evidence", ("image",)),),
                          actions=(action("submit", "Submit", "primary"),))  # fmt: skip
    dify.add_app("app-file-form", "advanced-chat", human_input=node, user_input_form=[], token_delay=0.002)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow", "app-file-form")):
        card = await say(dingtalk, "here is my claim")
        waiting = await say(dingtalk, "Submit")
        picture = dingtalk.make_message("picture", sender_staff_id="asker1", sender_nick="Ada")
        answered = await deliver(dingtalk, picture)
    assert "- `evidence`: a picture or file, sent after your answer" in card.final_content
    assert waiting.final_content == forms.ANSWER_SEND_FILE.format(name="evidence", title="Review")
    (submission,) = dify.form_submissions
    evidence = submission["inputs"]["evidence"]
    assert evidence["type"] == "image" and evidence["transfer_method"] == "local_file"
    assert dify.uploads[evidence["upload_file_id"]].user == USER  # uploaded as the run's own Dify user
    assert answered.final_content.startswith("Decision: Submit (submit), evidence: ")


@pytest.mark.parametrize("status", [404, 400])
@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
async def test_a_dify_refusing_the_events_route_still_takes_the_answer(tmp_path, dingtalk, dify, status, app_type):
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        await say(dingtalk, "deploy?")
        dify.configure(KEYS[app_type], events_route_status=status)
        answered = await say(dingtalk, "1 ok")
    assert len(dify.form_submissions) == 1
    if app_type == "chatflow":
        assert answered.final_content == forms.ANSWER_NOT_PASSED.format(title="Review")
    else:  # the run record, read until the resumed run ended
        assert answered.final_content == "approve\n\nApprove\n\nok\n\ndeploy?"


async def test_a_resumed_answer_goes_on_in_the_same_conversation(tmp_path, dingtalk, dify):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        first = await say(dingtalk, "turn one")
        await say(dingtalk, "1")
        await say(dingtalk, "turn two")
    conversations = {json.dumps(r.json.get("conversation_id")) for r in dify.requests_to("/chat-messages")}
    assert len(dify.conversations) == 1 and len(conversations) == 2  # new, then continued
    assert first.final_content.startswith("📝 **Review**")


async def test_a_form_kept_in_redis_is_answered_by_another_host(tmp_path, dingtalk, dify):
    from tests.integration.redis_server import redis_server

    with redis_server(tmp_path) as redis:
        config = config_for(tmp_path, dingtalk, dify, "chatflow", store=redis.url)
        async with running_bot(config):  # host A
            await say(dingtalk, "asked on one host")
        async with running_bot(config):  # host B (or A restarted): the same shared store
            answered = await say(dingtalk, "1 answered on another")
    assert answered.final_content == (
        "Decision: Approve (approve), comment: answered on another, query: asked on one host"
    )


async def test_answering_a_form_after_new_does_not_bring_the_old_conversation_back(tmp_path, dingtalk, dify):
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        await say(dingtalk, "in the old conversation")
        await say(dingtalk, "/new")
        answered = await say(dingtalk, "1 ok")
        dify.apps[KEYS["chatflow"]].human_input = None
        fresh = await say(dingtalk, "a fresh start")
    assert answered.final_content.startswith("Decision: Approve (approve), comment: ok")
    first, last = dify.requests_to("/chat-messages")[0], dify.requests_to("/chat-messages")[-1]
    assert "conversation_id" not in first.json and "conversation_id" not in last.json
    assert fresh.final_content == echo("a fresh start", dify)
