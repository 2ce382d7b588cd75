"""`dingdifyd chat`: the terminal as the card, through the same bridge code, against the fake Dify."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from dingdifyd.simulator.dify_dialect import VERSIONS
from dingdifyd.simulator.fake_dify import start_fake_dify
from dingdifyd.simulator.fake_dingtalk import FakeDingTalk
from tests.integration.harness import bot_entry, dify_key, write_config

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("version", VERSIONS)
async def test_terminal_chat_streams_answers_and_keeps_context(tmp_path, version):
    dify = await start_fake_dify(default_apps=True, version=version)
    dify.configure(dify_key("chatflow"), token_delay=0.002, mention_turn=True)
    unused_dingtalk = FakeDingTalk()  # chat needs no DingTalk; the config still names one
    try:
        config = write_config(tmp_path / "c.yaml", unused_dingtalk, dify, bots=[bot_entry(app_type="chatflow")])
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dingdifyd", "chat", "-c", str(config), "--bot", "helpdesk",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NO_PROXY": "127.0.0.1"},
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(b"first question\nsecond question\n\n"), 30)
    finally:
        await dify.close()
    text = out.decode()
    assert process.returncode == 0, err.decode()
    assert "bot> Echo: first question | Turn 1 of this conversation." in text
    assert "bot> Echo: second question | Turn 2 of this conversation." in text
    assert text.count(dify.answer_tail) == 2
    first, second = dify.requests_to("/chat-messages")
    assert "conversation_id" not in first.json
    assert dify.conversations[second.json["conversation_id"]].queries == ["first question", "second question"]
