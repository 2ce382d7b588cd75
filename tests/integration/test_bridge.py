"""The whole bridge, end to end: a message pushed by the fake DingTalk over the real SDK's WebSocket, answered by the
fake Dify over HTTP/SSE, streamed into a card on the fake DingTalk. Nothing of ours is mocked. Every test runs
against a Dify 0.15.3 and a Dify 1.16.1."""

from __future__ import annotations

import logging

import pytest

from tests.integration.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    ask,
    bot_entry,
    dify_key,
    echo,
    running_bot,
    write_config,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dify(any_dify):
    """Each test of this module against each Dify version."""
    return any_dify


async def test_one_to_one_answer_streams_into_a_card(tmp_path, dingtalk, dify):
    # slow enough for updates between the first text and the end (a faster answer is coalesced into the final)
    dify.next_request(dify_key("chatbot"), token_delay=0.03)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await ask(dingtalk, "hello there", sender_staff_id="staff42", sender_nick="Zhang San")
    assert card.final_content == echo("hello there", dify)
    assert not card.failed
    assert card.template_id == "tpl-bridge.schema"
    assert card.create_body["openSpaceId"] == "dtv1.card//IM_ROBOT.staff42"
    # typewriter: the text grew over several updates, each the full text so far
    assert len(card.contents) >= 2
    assert all(echo("hello there", dify).startswith(c) for c in card.contents)
    (request,) = dify.requests_to("/chat-messages")
    assert request.json["user"] == "dingtalk:dingcorp001:staff42"
    assert "Zhang" not in str(request.json)
    assert request.json["response_mode"] == "streaming"


async def test_group_message_answers_in_the_group(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        card = await ask(dingtalk, "what is up", group=True, conversation_id="cidTEAM==")
    assert card.final_content == echo("what is up", dify)  # the @mention's leading space is gone
    assert card.create_body["openSpaceId"] == "dtv1.card//IM_GROUP.cidTEAM=="
    assert card.create_body["imGroupOpenDeliverModel"] == {"robotCode": CLIENT_ID}


async def test_second_turn_continues_the_conversation(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await ask(dingtalk, "first", sender_staff_id="u1")
        await ask(dingtalk, "second", sender_staff_id="u1")
        await ask(dingtalk, "other person", sender_staff_id="u2")
    first, second, other = dify.requests_to("/chat-messages")
    assert "conversation_id" not in first.json
    conversation = dify.conversations[second.json["conversation_id"]]
    assert conversation.queries == ["first", "second"]
    assert "conversation_id" not in other.json  # another person, another context


@pytest.mark.parametrize("app_type", ["chatbot", "agent", "chatflow", "workflow", "completion"])
async def test_every_app_type_answers(tmp_path, dingtalk, dify, app_type):
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type=app_type)])
    async with running_bot(config):
        card = await ask(dingtalk, "types")
    assert not card.failed
    assert "types" in card.final_content
    assert dify.answer_tail in card.final_content


async def test_workflow_without_streamed_text_answers_from_its_outputs(tmp_path, dingtalk, dify):
    dify.configure(dify_key("workflow"), workflow_streams_text=False)
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type="workflow")])
    async with running_bot(config):
        card = await ask(dingtalk, "outputs only")
    assert not card.failed
    assert "outputs only" in card.final_content


async def test_a_redelivered_message_gets_no_second_card_and_no_second_dify_call(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)) as bot:
        data = dingtalk.make_text_message("only once")
        frame = dingtalk.push_message(CLIENT_ID, data)
        await dingtalk.wait_ack(frame)
        dingtalk.redeliver(frame)
        await dingtalk.wait_for(lambda: len(dingtalk.acks_for(frame)) >= 2, 10, "the redelivery's ACK")
        await dingtalk.wait_card_final(lambda c: True, timeout=20)
        # a frame is ACKed only after the bridge decided about it, and an answer it takes is in flight at once:
        # once nothing is in flight, every answer the two deliveries could have started has ended
        await dingtalk.wait_for(lambda: bot.bridge.in_flight == 0, 20, "the answers to end")
        assert bot.bridge.redeliveries == 1
        assert (bot.bridge.answered, bot.bridge.failed) == (1, 0)
    assert len(dingtalk.cards) == 1
    assert len(dify.requests_to("/chat-messages")) == 1


@pytest.mark.parametrize(
    ("fault", "visible"),
    [
        ({"http_500": True}, "error"),
        ({"error_after": 3}, "error"),
        ({"stall_after": 3}, "took too long"),
        ({"cut_after": 3}, "cut off"),
    ],
)
async def test_dify_failures_end_the_card_with_a_clear_error_and_the_bot_keeps_serving(
    tmp_path, dingtalk, dify, fault, visible
):
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, dify_idle_timeout=0.5)
    async with running_bot(config):
        for _ in range(2 if "http_500" in fault else 1):  # a 500 before the answer is tried once more
            dify.next_request(dify_key("chatbot"), **fault)
        failed = await ask(dingtalk, "this fails")
        after = await ask(dingtalk, "this works")
    assert failed.failed
    assert visible in failed.final_content
    assert "Traceback" not in failed.final_content
    assert after.final_content == echo("this works", dify)
    assert not after.failed


async def test_zero_remain_time_starts_a_new_conversation_with_every_message(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, dify_conversation_remain_time=0)
    async with running_bot(config):
        await ask(dingtalk, "first", sender_staff_id="u5")
        await ask(dingtalk, "second", sender_staff_id="u5")
    first, second = dify.requests_to("/chat-messages")
    assert "conversation_id" not in first.json
    assert "conversation_id" not in second.json  # as the man page says: 0 forgets at once


async def test_a_restart_keeps_the_conversation(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "c.yaml", dingtalk, dify)
    async with running_bot(config):
        await ask(dingtalk, "before restart", sender_staff_id="u9")
    async with running_bot(config):
        await ask(dingtalk, "after restart", sender_staff_id="u9")
    _, second = dify.requests_to("/chat-messages")
    assert dify.conversations[second.json["conversation_id"]].queries == ["before restart", "after restart"]


async def test_a_conversation_gone_on_the_dify_side_is_started_afresh(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await ask(dingtalk, "one", sender_staff_id="u3")
        dify.conversations.clear()  # deleted in Dify, or expired there first
        card = await ask(dingtalk, "two", sender_staff_id="u3")
    assert card.final_content == echo("two", dify)
    requests = dify.requests_to("/chat-messages")
    assert len(requests) == 3  # one, two (404), two again without the stale id
    assert "conversation_id" in requests[1].json
    assert "conversation_id" not in requests[2].json


async def test_new_command_starts_a_fresh_conversation(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await ask(dingtalk, "remember me", sender_staff_id="u4")
        reset = await ask(dingtalk, "/new", sender_staff_id="u4")
        await ask(dingtalk, "fresh start", sender_staff_id="u4")
        helped = await ask(dingtalk, "/help", sender_staff_id="u4")
    assert "new conversation" in reset.final_content.lower()
    assert "/new" in helped.final_content
    _, fresh = dify.requests_to("/chat-messages")  # neither command reached Dify
    assert "conversation_id" not in fresh.json


async def test_builtin_card_template_when_none_is_configured(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, dingtalk_ai_card_template_id=None)
    async with running_bot(config):
        card = await ask(dingtalk, "builtin")
    assert card.template_id == "382e4302-551d-4880-bf29-a30acfab2e71.schema"
    assert card.flow_status == "3"
    assert card.final_content == echo("builtin", dify)


async def test_card_creation_refused_falls_back_to_a_markdown_reply(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        dingtalk.deny_scopes(CLIENT_ID, "Card.Instance.Write")  # no template helps: straight to markdown
        dingtalk.push_message(CLIENT_ID, dingtalk.make_text_message("no card please"))
        (reply,) = await dingtalk.wait_webhook_replies(1, timeout=20)
    assert reply.msgtype == "markdown"
    assert echo("no card please", dify) in reply.text


async def test_no_secret_and_no_message_text_in_the_logs(tmp_path, dingtalk, dify, caplog):
    caplog.set_level(logging.DEBUG)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        await ask(dingtalk, "a very private question")
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert CLIENT_SECRET not in everything
    assert dify_key("chatbot") not in everything
    for token in list(dingtalk._tokens):
        assert token not in everything
    info_and_above = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "private question" not in info_and_above
    assert dify.answer_tail not in info_and_above
    assert "message" in info_and_above  # the lifecycle is still logged, by id
