"""Dify 1.x's app modes: an `agent` app (the Dify Agent runtime) answers on the chat route; `channel` and
`rag-pipeline` apps cannot answer a chat and are refused at start, naming the key; `auto` and `doctor` name the
exact mode."""

from __future__ import annotations

import io
import logging

import pytest

from dingdifyd import config
from dingdifyd.bridge.session import out_track_id
from dingdifyd.commands.doctor import doctor_main
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.errors import EX_CONFIG, ConfigError
from dingdifyd.simulator.dify import DIFY_1_16, FakeDify, start_fake_dify
from dingdifyd.worker.runtime import BotRuntime
from tests.integration.harness import CLIENT_ID, bot_entry, echo, running_bot, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def dify():
    fake = await start_fake_dify(version=DIFY_1_16)
    fake.add_app("app-agent-runtime", "agent", name="runtime agent", token_delay=0.002)
    fake.add_app("app-pipeline", "rag-pipeline", name="knowledge pipeline")
    fake.add_app("app-channel", "channel", name="a channel")
    yield fake
    await fake.close()


async def test_an_agent_mode_app_answers_on_the_chat_route_with_auto(tmp_path, dingtalk, dify: FakeDify, caplog):
    caplog.set_level(logging.INFO, logger="dingdifyd")
    bots = [bot_entry(app_type="auto", dify_key="app-agent-runtime")]
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)):
        data = dingtalk.make_text_message("hello runtime")
        dingtalk.push_message(CLIENT_ID, data)
        message = parse_incoming(data)
        assert message is not None
        card = await dingtalk.wait_card_final(out_track_id(message), timeout=20)
    assert card.final_content == echo("hello runtime", dify)
    assert len(dify.requests_to("/chat-messages")) == 1
    assert "bots[0]: Dify app type agent (auto, agent app, mode agent)" in caplog.text


@pytest.mark.parametrize(("key", "mode"), [("app-pipeline", "rag-pipeline"), ("app-channel", "channel")])
@pytest.mark.parametrize("app_type", ["auto", "chatflow"])
async def test_an_app_that_cannot_chat_is_refused_at_start_naming_the_key(
    tmp_path, dingtalk, dify, key, mode, app_type
):
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=[bot_entry(app_type=app_type, dify_key=key)])
    loaded = config.load(path, environ={})
    with pytest.raises(ConfigError) as refused:
        await BotRuntime(loaded.bot("helpdesk"), loaded).run()
    (problem,) = refused.value.problems
    assert problem.startswith(f"bots[0].dify_app_api_key: the key belongs to a Dify {mode} app")
    assert not dify.requests_to("/chat-messages") and not dify.requests_to("/workflows/run")
    assert dingtalk.connections == 0  # no message taken


async def test_doctor_names_the_mode_and_what_to_fix(tmp_path, dingtalk, dify):
    bots = [bot_entry(name="agent", app_type="auto", dify_key="app-agent-runtime"),
            bot_entry(name="pipeline", app_type="auto", dify_key="app-pipeline")]  # fmt: skip
    path = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots)
    report = io.StringIO()
    code = await doctor_main(config.load(path, environ={}), None, report)
    out = report.getvalue()
    assert code == EX_CONFIG
    assert "OK    agent: Dify app type: auto: a agent app (mode agent)" in out
    assert "Dify 1.16.1" in out  # the version Dify named
    assert "FAIL  pipeline: Dify app type: the key belongs to a Dify rag-pipeline app (mode rag-pipeline)" in out
    assert "set bots[1].dify_app_api_key to the key of a chatbot, agent, chatflow, workflow or completion app" in out
