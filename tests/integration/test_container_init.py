"""The container image's PID 1 (packaging/container/dingdifyd-init) around the real daemon, outside a container:
the health check follows the bots, logs go to stdout without journal prefixes, SIGTERM stops the daemon
gracefully, orphans are reaped, and a daemon whose watchdog pings stop is aborted, as systemd would do.

(Not being PID 1 here, the init makes itself a child subreaper, so orphans come to it all the same.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dingdifyd.bridge.session import out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.simulator.dingtalk import FakeDingTalk
from tests.integration.harness import CLIENT_ID, CLIENT_SECRET, write_config

INIT = Path(__file__).resolve().parents[2] / "packaging" / "container" / "dingdifyd-init"
WAIT = 30.0
pytestmark = pytest.mark.timeout(90)


class Init:
    def __init__(self, process: asyncio.subprocess.Process, run_dir: Path, output: asyncio.Task[bytes]):
        self.process = process
        self.run_dir = run_dir
        self.output = output

    def health(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(INIT), "--health"], capture_output=True, text=True, timeout=20,
                              env={**os.environ, "DINGDIFYD_INIT_DIR": str(self.run_dir)})  # fmt: skip

    async def until_healthy(self) -> str:
        async def poll() -> str:
            while (result := self.health()).returncode != 0:
                await asyncio.sleep(0.1)
            return result.stdout

        return await asyncio.wait_for(poll(), WAIT)

    def children(self) -> list[int]:
        return [int(p) for p in Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()]


async def start_init(tmp_path: Path, config: Path, *, watchdog: float = 60, prefix: list[str] | None = None) -> Init:
    run_dir = tmp_path / "run"
    env = {**os.environ, "DINGDIFYD_INIT_DIR": str(run_dir), "DINGDIFYD_WATCHDOG_SEC": str(watchdog),
           "NO_PROXY": "127.0.0.1,localhost"}  # fmt: skip
    env.pop("JOURNAL_STREAM", None)
    command = [*(prefix or []), sys.executable, "-m", "dingdifyd", "run", "-c", str(config)]
    process = await asyncio.create_subprocess_exec(sys.executable, str(INIT), "--", *command, env=env,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return Init(process, run_dir, asyncio.create_task(process.stdout.read()))  # type: ignore[union-attr]


@pytest.fixture
async def init(tmp_path, dingtalk, dify) -> AsyncIterator[Init]:
    config = write_config(tmp_path / "daemon.yaml", dingtalk, dify, stop_timeout=3, restart_delay_min=0.05)
    started = await start_init(tmp_path, config)
    try:
        yield started
    finally:
        if started.process.returncode is None:
            started.process.kill()
            await started.process.wait()


async def answer(dingtalk: FakeDingTalk, text: str) -> str:
    data = dingtalk.make_text_message(text)
    message = parse_incoming(data)
    assert message is not None
    dingtalk.push_message(CLIENT_ID, data)
    card = await dingtalk.wait_card_final(out_track_id(message), timeout=WAIT)
    return card.final_content


async def test_health_follows_the_bots_and_sigterm_stops_gracefully(init, dingtalk):
    before = init.health()
    healthy = await init.until_healthy()
    assert before.returncode == 1 and before.stdout.startswith("unhealthy: "), before.stdout
    assert healthy.startswith("healthy: 1/1 bots connected"), healthy
    assert "Echo: hello container" in await answer(dingtalk, "hello container")

    init.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(init.process.wait(), WAIT) == 0
    output = (await init.output).decode()
    after = init.health()
    assert after.returncode == 1 and "stopping" in after.stdout, after.stdout
    # the daemon's log lines are the container's stdout: time and level, no journal priority prefix
    lines = [line for line in output.splitlines() if "[supervisor]" in line]
    assert any(" INFO [supervisor] dingdifyd.supervisor.arbiter: ready:" in line for line in lines), output
    assert any("all bot processes stopped" in line for line in lines), output
    assert not [line for line in output.splitlines() if line.startswith("<")], output
    assert CLIENT_SECRET not in output
    assert (await init.process.stderr.read()) == b""  # type: ignore[union-attr]


async def test_health_is_unhealthy_while_dingtalk_cannot_be_reached(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "daemon.yaml", dingtalk, dify, stop_timeout=3, restart_delay_min=0.05)
    await dingtalk.close()  # the bot cannot connect: the daemon keeps trying, never ready
    started = await start_init(tmp_path, config)
    try:
        async def reported() -> str:
            while "restarting" not in (result := started.health()).stdout:
                await asyncio.sleep(0.1)
            return result.stdout

        text = await asyncio.wait_for(reported(), WAIT)
        assert text.startswith("unhealthy: starting: 0/1 bots connected"), text
        assert started.health().returncode == 1
    finally:
        started.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(started.process.wait(), WAIT) == 0


async def test_orphans_are_reaped(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "daemon.yaml", dingtalk, dify, stop_timeout=3)
    # the shell leaves a short-lived background process behind, then becomes the daemon: that process is orphaned
    prefix = ["sh", "-c", '(sleep 0.5 &) ; exec "$@"', "sh"]
    started = await start_init(tmp_path, config, prefix=prefix)
    try:
        await started.until_healthy()
        [daemon] = started.children()

        async def only_the_daemon_left() -> None:
            while started.children() != [daemon]:
                await asyncio.sleep(0.1)

        await asyncio.wait_for(only_the_daemon_left(), WAIT)  # a zombie would stay listed until reaped
    finally:
        started.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(started.process.wait(), WAIT) == 0


async def test_a_daemon_whose_watchdog_stops_is_aborted(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "daemon.yaml", dingtalk, dify, stop_timeout=3)
    started = await start_init(tmp_path, config, watchdog=2)
    try:
        await started.until_healthy()
        [daemon] = started.children()
        os.kill(daemon, signal.SIGSTOP)  # hung: no more pings
        code = await asyncio.wait_for(started.process.wait(), WAIT)
    finally:
        if started.process.returncode is None:
            started.process.kill()
            await started.process.wait()
    assert code == 128 + signal.SIGABRT, code
    error = (await started.process.stderr.read()).decode()  # type: ignore[union-attr]
    assert "no watchdog ping for 2 s: aborting the daemon" in error
    assert not Path(f"/proc/{daemon}").exists() or "Z" in Path(f"/proc/{daemon}/stat").read_text().split()[2]
