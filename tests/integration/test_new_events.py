"""Dify 1.x's new events, end to end, and the same situations on 0.15.3: reasoning follows `show_reasoning` (1.x
streams it apart as `reasoning_chunk`, 0.15.3 inside `<think>`), moderation replaces the answer even mid-stream,
a file the answer shows reaches the person once, retries and iteration rounds show as progress, and events of
Difys to come are harmless."""

from __future__ import annotations

import pytest

from dingdifyd.simulator.dify import MODERATED_ANSWER, REASONING, FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import ask, bot_entry, dify_key, echo, running_bot, write_config

pytestmark = pytest.mark.timeout(60)

PROGRESS_LATENCY = 1.0  # the model's silence before its first word: the step line shows after 0.5 s


@pytest.fixture
def dify(any_dify: FakeDify) -> FakeDify:
    return any_dify


def config_for(tmp_path, dingtalk: FakeDingTalk, dify: FakeDify, app_type: str, **options):
    bots = [bot_entry(app_type=app_type, **options)]
    return write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)


@pytest.mark.parametrize("app_type", ["chatflow", "workflow", "chatbot"])
async def test_reasoning_is_hidden_by_default_however_it_arrives(tmp_path, dingtalk, dify, app_type):
    dify.configure(dify_key(app_type), think=True, token_delay=0.01)
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await ask(dingtalk, "please think")
    assert card.final_content == echo("please think", dify)
    assert not any("reasoning words" in content for content in card.contents)


@pytest.mark.parametrize("app_type", ["chatflow", "workflow", "chatbot"])
async def test_reasoning_is_quoted_when_asked_however_it_arrives(tmp_path, dingtalk, dify, app_type):
    dify.configure(dify_key(app_type), think=True, token_delay=0.01)
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type, show_reasoning="quote")):
        card = await ask(dingtalk, "please think")
    # the same card whether the model's thinking came as reasoning_chunk (1.x) or inside <think> (0.15.3, chat)
    assert card.final_content == f"> 💭 **Thinking**<br>{REASONING}\n\n{echo('please think', dify)}"


@pytest.mark.parametrize("app_type", ["chatbot", "chatflow", "workflow"])
async def test_moderation_mid_stream_leaves_only_the_replacement(tmp_path, dingtalk, dify, app_type):
    # slow enough that the original words reach the card before the replacement does
    dify.configure(dify_key(app_type), replace_after=6, token_delay=0.05)
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await ask(dingtalk, "say something forbidden")
    assert card.final_content == MODERATED_ANSWER
    assert any(content.startswith("Echo: say") for content in card.contents)  # the original did show first
    replaced = card.contents.index(MODERATED_ANSWER)
    assert all("Echo" not in content for content in card.contents[replaced:])


@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
async def test_a_file_the_answer_shows_reaches_the_person_once(tmp_path, dingtalk, dify, app_type):
    """1.16.1 names the picture three times (a markdown image, `message_end.files`, `workflow_finished` files and
    outputs, each signed differently, 26b); 0.15.3 only in the text. One picture is uploaded and shown."""
    dify.configure(dify_key(app_type), answer_file=True)
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await ask(dingtalk, "draw me a chart")
    assert len(dingtalk.uploaded_media) == 1
    media_id = dingtalk.uploaded_media[0].media_id
    assert card.final_content.count(media_id) == 1
    assert card.final_content.startswith("Echo: draw me a chart")
    assert dingtalk.sent_messages == []  # not sent again as a message of its own


@pytest.mark.parametrize(
    ("step", "line"),
    [("node_retry", "🔁 Retrying LLM (attempt 2)…"), ("iteration", "⏳ Each iteration item (round 2)…"),
     ("loop", "⏳ Each loop item (round 2)…")],
)  # fmt: skip
async def test_retries_and_rounds_show_as_progress(tmp_path, dingtalk, dify, step, line):
    dify.configure(dify_key("workflow"), steps=(step,), first_token_delay=PROGRESS_LATENCY)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "workflow")):
        card = await ask(dingtalk, "work hard")
    assert line in card.contents
    assert card.final_content == echo("work hard", dify)


async def test_an_agent_log_shows_as_progress(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatflow"), steps=("agent_log",), first_token_delay=PROGRESS_LATENCY)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "chatflow")):
        card = await ask(dingtalk, "agent at work")
    assert "🔧 ROUND 1…" in card.contents
    assert card.final_content == echo("agent at work", dify)


@pytest.mark.parametrize("app_type", ["chatbot", "agent", "chatflow", "workflow", "completion"])
async def test_events_of_a_dify_to_come_are_harmless(tmp_path, dingtalk, dify, app_type):
    dify.configure(dify_key(app_type), steps=("quantum_entangled", "iteration_completed", "loop_completed"))
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await ask(dingtalk, "future proof")
    assert not card.failed
    assert "future proof" in card.final_content
