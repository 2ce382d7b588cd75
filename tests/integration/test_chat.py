"""`dingdifyd chat`: the terminal as the card, through the same bridge code, against the fake Dify."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dingdifyd.commands.chat import PROMPT
from dingdifyd.simulator.dify import VERSIONS, FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import bot_entry, dify_key, write_config

pytestmark = pytest.mark.timeout(60)
WAIT = 30.0


@pytest.fixture(params=VERSIONS)
async def dify(request: pytest.FixtureRequest) -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True, version=request.param)
    fake.configure(dify_key("chatflow"), token_delay=0.002, mention_turn=True)
    yield fake
    await fake.close()


@pytest.fixture
def config(tmp_path: Path, dify: FakeDify) -> Path:
    unused_dingtalk = FakeDingTalk()  # chat needs no DingTalk; the config still names one
    return write_config(tmp_path / "c.yaml", unused_dingtalk, dify, bots=[bot_entry(app_type="chatflow")])


class Terminal:
    """`dingdifyd chat` in a subprocess, its stderr merged into its stdout as on a terminal."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.output = ""

    @classmethod
    async def start(cls, config: Path) -> Terminal:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dingdifyd", "chat", "-c", str(config), "--bot", "helpdesk",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "NO_PROXY": "127.0.0.1"},
        )  # fmt: skip
        return cls(process)

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    async def wait_for(self, text: str, after: int = 0) -> int:
        """Read the output until `text` appears at or after `after`; where it starts."""
        assert self.process.stdout is not None

        async def read() -> int:
            while (found := self.output.find(text, after)) < 0:
                chunk = await self.process.stdout.read(4096)  # type: ignore[union-attr]
                if not chunk:
                    raise AssertionError(f"the chat ended before {text!r}; it printed:\n{self.output}")
                self.output += chunk.decode()
            return found

        return await asyncio.wait_for(read(), WAIT)

    async def finish(self) -> int:
        assert self.process.stdout is not None
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        rest = await asyncio.wait_for(self.process.stdout.read(), WAIT)
        self.output += rest.decode()
        return await asyncio.wait_for(self.process.wait(), WAIT)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def test_terminal_chat_streams_answers_and_keeps_context(config, dify):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd", "chat", "-c", str(config), "--bot", "helpdesk",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_PROXY": "127.0.0.1"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(b"first question\nsecond question\n\n"), 30)
    text = out.decode()
    assert process.returncode == 0, err.decode()
    assert "bot> Echo: first question | Turn 1 of this conversation." in text
    assert "bot> Echo: second question | Turn 2 of this conversation." in text
    assert text.count(dify.answer_tail) == 2
    first, second = dify.requests_to("/chat-messages")
    assert "conversation_id" not in first.json
    assert dify.conversations[second.json["conversation_id"]].queries == ["first question", "second question"]


async def test_stop_typed_while_an_answer_streams_stops_it_at_once(config, dify):
    dify.configure(dify_key("chatflow"), token_delay=0.3)  # about 5 s of answer
    terminal = await Terminal.start(config)
    try:
        terminal.type("a long question")
        await terminal.wait_for("bot> Echo: a long")
        terminal.type("/stop")
        await terminal.wait_for("Stopped the answer in progress.")
        await terminal.wait_for("⏹️ Stopped.")
        terminal.type("")
        assert await terminal.finish() == 0, terminal.output
    finally:
        terminal.kill()
    assert "Nothing is being answered" not in terminal.output
    assert dify.answer_tail not in terminal.output  # cut short, not waited for
    assert any(stop.found for stop in dify.stops), "the Dify run was not stopped"


async def test_ctrl_c_during_an_answer_interrupts_it_and_stops_the_dify_run(config, dify):
    dify.configure(dify_key("chatflow"), token_delay=0.3)
    terminal = await Terminal.start(config)
    try:
        terminal.type("a long question")
        await terminal.wait_for("bot> Echo: a long")
        terminal.process.send_signal(signal.SIGINT)
        assert await terminal.finish() == 130, terminal.output
    finally:
        terminal.kill()
    assert "Interrupted (Ctrl-C)." in terminal.output
    assert "restarting" not in terminal.output
    assert "Traceback" not in terminal.output
    assert any(stop.found for stop in dify.stops), "the Dify run was not stopped"


async def test_a_warning_logged_during_an_answer_gets_a_line_of_its_own(config, dify):
    dify.configure(dify_key("chatflow"), token_delay=0.05, error_after=3)  # the model fails mid-answer
    terminal = await Terminal.start(config)
    try:
        terminal.type("question that fails")
        await terminal.wait_for("⚠️")
        terminal.type("")
        assert await terminal.finish() == 0, terminal.output
    finally:
        terminal.kill()
    warnings = [line for line in terminal.output.splitlines() if "WARNING" in line]
    assert warnings, terminal.output
    assert all(line.startswith("WARNING ") for line in warnings), terminal.output
    # the card goes on after the log line, on a line of its own again
    lines = terminal.output.splitlines()
    after = lines[lines.index(warnings[0]) + 1]
    assert PROMPT + "Echo: question" in after, terminal.output
