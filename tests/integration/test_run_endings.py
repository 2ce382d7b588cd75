"""Every way a Dify run ends is told truthfully in the card, against Dify 0.15.3 and 1.16.1: stopped in Dify by
someone else (the card keeps what was written, says it stopped, and sends no stop back), failed (with Dify's
reason when a person may read it), and answered even when 1.16.1 ends a finished workflow as "stopped"."""

from __future__ import annotations

import pytest

from dingdifyd.bridge.run_reading import EMPTY_ANSWER
from dingdifyd.bridge.running import STOPPED
from dingdifyd.errors import DifyError
from dingdifyd.simulator.dify import FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import ask, bot_entry, dify_key, running_bot, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def dify(any_dify: FakeDify) -> FakeDify:
    return any_dify


def config_for(tmp_path, dingtalk: FakeDingTalk, dify: FakeDify, app_type: str, key: str | None = None):
    return write_config(tmp_path / "c.yaml", dingtalk, dify,
                        bots=[bot_entry(app_type=app_type, dify_key=key or dify_key(app_type))])  # fmt: skip


@pytest.mark.parametrize("app_type", ["chatflow", "workflow"])
async def test_a_run_stopped_in_dify_keeps_its_text_and_says_it_stopped(tmp_path, dingtalk, dify, app_type):
    dify.configure(dify_key(app_type), stopped_after=4)  # the Dify console stops it after four words
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await ask(dingtalk, "stop me elsewhere")
    assert not card.failed
    assert card.final_content == f"Echo: stop me elsewhere\n\n{STOPPED}"
    assert "try again" not in card.final_content and "cut off" not in card.final_content
    assert [s for s in dify.stops if s.user != "dingdifyd-probe"] == []  # nothing sent back to stop it


async def test_a_workflow_stopped_in_dify_before_any_text_is_not_an_empty_answer(tmp_path, dingtalk, dify):
    dify.configure(dify_key("workflow"), stopped_after=0)  # stopped before its first word: outputs {} (87)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "workflow")):
        card = await ask(dingtalk, "stopped at once")
    assert card.final_content == STOPPED
    assert EMPTY_ANSWER not in card.final_content


async def test_a_missing_required_input_is_named_in_the_card(tmp_path, dingtalk, dify):
    """0.15.3 refuses the request (HTTP 400), 1.16.1 fails the run inside the stream (82): the card says the same."""
    form = [
        {"text-input": {"label": "Query", "variable": "query", "required": True, "max_length": 256}},
        {"text-input": {"label": "Department", "variable": "department", "required": True}},
    ]
    dify.add_app("app-needs-department", "workflow", user_input_form=form, token_delay=0.002)
    async with running_bot(config_for(tmp_path, dingtalk, dify, "workflow", "app-needs-department")):
        card = await ask(dingtalk, "which department?")
    assert card.failed
    assert card.final_content == "⚠️ The AI app could not answer: department is required in input form"


@pytest.mark.parametrize("app_type", ["chatbot", "chatflow", "workflow"])
async def test_a_failure_whose_reason_is_internal_shows_the_plain_note(tmp_path, dingtalk, dify, app_type):
    async with running_bot(config_for(tmp_path, dingtalk, dify, app_type)):
        card = await ask(dingtalk, "fail500 please")
    assert card.failed
    assert card.final_content == f"⚠️ {DifyError.user_message}"
    assert "upstream" not in card.final_content
