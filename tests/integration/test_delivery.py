"""Delivery under pressure, end to end through the bot runtime: the shared card-call scheduler under DingTalk's
real 20/s limit, refusals recovered, the call accounting and monthly budget, and the fallback ladder
(configured template → built-in template → sessionWebhook markdown → robot send API). Real sockets, the real
SDK, the fake DingTalk and the fake Dify; nothing of ours is mocked."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from dingdifyd.dingtalk.cards import BUILTIN_TEMPLATE_ID
from dingdifyd.simulator import dingtalk as fd
from dingdifyd.simulator.dify import FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from dingdifyd.store.disk import DiskStore
from tests.integration.harness import CLIENT_ID, ask, dify_key, echo, push, running_bot, write_config

pytestmark = pytest.mark.timeout(120)

CARD_APIS = (fd.API_CREATE_AND_DELIVER, fd.API_CARD_STREAMING, fd.API_CARD_UPDATE)
# The production holds (1 s after a QpsLimit refusal) and retries, shortened for the tests.
FAST_BACKOFF = {"hold_base": 0.05, "hold_cap": 0.2, "retry_base": 0.02, "retry_cap": 0.1}


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True)
    fake.configure(dify_key("chatbot"), token_delay=0.005)
    yield fake
    await fake.close()


def card_calls(dingtalk: FakeDingTalk) -> int:
    return sum(dingtalk.calls[api] for api in CARD_APIS)


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# --- the scheduler under load --------------------------------------------------------------------------------


async def test_fifty_simultaneous_conversations_stay_under_the_limit_and_every_card_ends_exact(
    tmp_path, dingtalk, dify, caplog
):
    caplog.set_level(logging.INFO)
    dify.configure(dify_key("chatbot"), token_delay=0.02)  # each answer streams for about half a second
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)) as runtime:
        questions = [f"question {i}" for i in range(50)]
        tracks = [
            push(dingtalk, q, sender_staff_id=f"user{i:02d}", group=i % 5 == 0, conversation_id=f"cidG{i}==")
            for i, q in enumerate(questions)
        ]
        cards = await asyncio.gather(*(dingtalk.wait_card_final(t, timeout=90) for t in tracks))
    assert sum(dingtalk.qps_rejections.values()) == 0
    assert [card.final_content for card in cards] == [echo(q) for q in questions]
    assert not any(card.failed for card in cards)
    # every call counted: the accounting, and the per-reply "N card calls" log lines, add up to what DingTalk saw
    assert runtime.accounting is not None
    assert runtime.accounting.month == card_calls(dingtalk)
    per_reply = [int(m.group(1)) for r in caplog.records if (m := re.search(r"\((\d+) card calls", r.getMessage()))]
    assert len(per_reply) == 50
    assert sum(per_reply) == card_calls(dingtalk)


async def test_rate_limit_and_server_error_bursts_on_card_updates_are_recovered(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.02)
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify), card_backoff=FAST_BACKOFF) as runtime:
        dingtalk.fail_next(fd.API_CARD_STREAMING, 3, status=403, code=fd.QPS_LIMIT_CODE)
        dingtalk.fail_next(fd.API_CARD_STREAMING, 3, status=500, code="system.busy")
        questions = [f"burst {i}" for i in range(5)]
        tracks = [push(dingtalk, q, sender_staff_id=f"user{i}") for i, q in enumerate(questions)]
        cards = await asyncio.gather(*(dingtalk.wait_card_final(t, timeout=30) for t in tracks))
        assert runtime.scheduler is not None
        holds = runtime.scheduler.rate_limited
    assert [card.final_content for card in cards] == [echo(q) for q in questions]
    assert not any(card.failed for card in cards)
    assert holds == 3  # each QpsLimit refusal held the whole app
    assert dingtalk.calls[fd.API_CARD_STREAMING] >= 6 + len(cards)  # the refused calls were made again


async def test_a_final_update_that_keeps_failing_goes_out_as_a_markdown_reply(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify), card_backoff=FAST_BACKOFF):
        dingtalk.fail_next(fd.API_CARD_STREAMING, 100, status=500, code="system.busy")
        track = push(dingtalk, "unlucky")
        (reply,) = await dingtalk.wait_webhook_replies(1, timeout=30)
    assert reply.text == echo("unlucky")
    assert not dingtalk.cards[track].done


# --- accounting and the monthly budget -------------------------------------------------------------------------


async def test_call_counts_survive_a_restart(tmp_path, dingtalk, dify):
    path = write_config(tmp_path / "c.yaml", dingtalk, dify)
    async with running_bot(path) as runtime:
        await ask(dingtalk, "before restart", timeout=30)
    first_run = card_calls(dingtalk)
    async with running_bot(path) as runtime:
        assert runtime.accounting is not None
        assert runtime.accounting.month == first_run
        await ask(dingtalk, "after restart", timeout=30)
        # the card is final as soon as DingTalk has the call; the bot counts it once the answer comes back
        await dingtalk.wait_for(lambda: runtime.bridge.in_flight == 0, 10, "the answer to end")
        counted = runtime.accounting.stats()
    assert counted == {"dingtalk_calls_today": card_calls(dingtalk), "dingtalk_calls_month": card_calls(dingtalk)}


async def test_a_used_budget_leaves_only_the_final_answer(tmp_path, dingtalk, dify, caplog):
    dify.configure(dify_key("chatbot"), token_delay=0.03)  # slow: without a budget it would update many times
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, dingtalk_api_monthly_budget=1)
    async with running_bot(path):
        card = await ask(dingtalk, "budget gone", timeout=30)
    assert card.contents == [echo("budget gone")]  # creating it used the budget up: no text until the final
    assert warnings(caplog, "the monthly budget is used up")


async def test_a_nearly_used_budget_sends_the_first_text_and_the_final_answer_only(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.03)
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, dingtalk_api_monthly_budget=1000)
    store = DiskStore(tmp_path / "state" / "helpdesk")
    store.incr(f"dingtalk-calls/month/{datetime.now():%Y-%m}", 960)  # 40 left: within the last 5 %
    store.close()
    async with running_bot(path):
        card = await ask(dingtalk, "nearly gone", timeout=30)
    assert len(card.contents) == 2
    assert card.contents[-1] == echo("nearly gone")


# --- the fallback ladder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["param.templateNotExist", "param.templateUnpublished"])
async def test_a_refused_template_falls_back_to_the_builtin_card_template(tmp_path, dingtalk, dify, caplog, code):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        dingtalk.fail_next(fd.API_CREATE_AND_DELIVER, 1, status=400, code=code)
        first = await ask(dingtalk, "first", sender_staff_id="u1", timeout=30)
        second = await ask(dingtalk, "second", sender_staff_id="u2", timeout=30)
    for card, question in ((first, "first"), (second, "second")):
        assert card.template_id == BUILTIN_TEMPLATE_ID
        assert card.flow_status == "3"
        assert card.final_content == echo(question)
    assert dingtalk.calls[fd.API_CREATE_AND_DELIVER] == 3  # the second answer went straight to the built-in one
    (logged,) = warnings(caplog, "using the built-in AI card template instead")  # once, with its fix
    assert code in logged and "dingtalk_ai_card_template_id" in logged


async def test_no_card_template_at_all_answers_with_a_markdown_reply(tmp_path, dingtalk, dify, caplog):
    dingtalk.templates = set()  # neither the configured template nor the built-in one exists here
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        push(dingtalk, "no cards here")
        (reply,) = await dingtalk.wait_webhook_replies(1, timeout=30)
    assert reply.msgtype == "markdown"
    assert reply.text == echo("no cards here")
    assert dingtalk.calls[fd.API_CREATE_AND_DELIVER] == 2
    assert dingtalk.cards == {}
    (logged,) = warnings(caplog, "built-in AI card template failed")
    assert "answering with a plain reply" in logged and "no built-in AI card template" in logged


async def test_without_card_permission_answers_go_by_webhook_and_the_log_says_what_to_grant(
    tmp_path, dingtalk, dify, caplog
):
    dingtalk.deny_scopes(CLIENT_ID, "Card.Instance.Write")
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        push(dingtalk, "one", sender_staff_id="u1")
        await dingtalk.wait_webhook_replies(1, timeout=30)
        push(dingtalk, "two", group=True, sender_staff_id="u2")
        replies = await dingtalk.wait_webhook_replies(2, timeout=30)
    assert sorted(reply.text for reply in replies) == [echo("one"), echo("two")]
    assert dingtalk.calls[fd.API_CREATE_AND_DELIVER] == 1  # after that refusal, cards are off for a while
    (logged,) = warnings(caplog, "AccessTokenPermissionDenied")
    assert "grant Card.Instance.Write in the DingTalk developer console" in logged


@pytest.mark.parametrize("group", [False, True], ids=["1:1", "group"])
@pytest.mark.parametrize("how", ["expired", "refused"])
async def test_a_dead_webhook_sends_the_answer_through_the_robot_send_api(tmp_path, dingtalk, dify, group, how):
    dingtalk.deny_scopes(CLIENT_ID, "Card.Instance.Write")  # no card: the answer must go as a message
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        past = int(time.time() * 1000) - 1000
        data = dingtalk.make_text_message(
            "late answer", group=group, sender_staff_id="staff9", conversation_id="cidTEAM9==",
            webhook_expires_ms=past if how == "expired" else None,
        )  # fmt: skip
        if how == "refused":
            dingtalk.expire_session(data["sessionWebhook"])  # valid by its expiry time, refused by DingTalk
        dingtalk.push_message(CLIENT_ID, data)
        (sent,) = await dingtalk.wait_for(lambda: dingtalk.sent_messages, 30, "a robot message")
    assert dingtalk.webhook_replies == []
    assert sent.api == (fd.API_GROUP_SEND if group else fd.API_BATCH_SEND)
    assert sent.body["msgKey"] == "sampleMarkdown"
    assert json.loads(sent.body["msgParam"])["text"] == echo("late answer")
    if group:
        assert sent.body["openConversationId"] == "cidTEAM9=="
    else:
        assert sent.body["userIds"] == ["staff9"]
