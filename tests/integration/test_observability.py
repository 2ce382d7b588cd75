"""What an admin asks a running daemon: `dingdifyd status` over its socket, and the Prometheus metrics.

The real daemon (`python -m dingdifyd run`: supervisor and bot processes, a real NOTIFY_SOCKET) against the
simulators; `dingdifyd status` as a command, the metrics over HTTP and parsed by prometheus-client's parser.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import CLIENT_SECRET, ask, bot_entry, write_config
from tests.integration.test_daemon import WAIT, AsyncNotifySocket, Daemon

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")
BROKEN_KEY = "app-refused-key-SECRET-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Ask again until the answer is there: the supervisor learns of a bot's figures with its next heartbeat."""

    async def loop() -> T:
        while (result := await probe()) is None:
            await asyncio.sleep(0.1)
        return result

    try:
        return await asyncio.wait_for(loop(), WAIT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def command(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def config(tmp_path: Path, dingtalk, dify, port: int) -> Path:
    """helpdesk answers; broken's Dify key is refused, so its process exits 78 and stays down."""
    bots = [bot_entry("helpdesk"), bot_entry("broken", dify_key=BROKEN_KEY)]
    return write_config(
        tmp_path / "ops.yaml", dingtalk, dify, bots=bots, stop_timeout=3, restart_delay_min=0.05,
        heartbeat_timeout=2, status_socket=str(tmp_path / "run" / "status.sock"), metrics_listen=f"127.0.0.1:{port}",
    )  # fmt: skip


@pytest.fixture
async def daemon(tmp_path: Path, config: Path) -> AsyncIterator[Daemon]:
    notify = AsyncNotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "NO_PROXY": "127.0.0.1,localhost"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dingdifyd", "run", "-c", str(config), env=env, stderr=asyncio.subprocess.PIPE
    )
    logs = asyncio.create_task(process.stderr.read())  # type: ignore[union-attr]
    try:
        await notify.wait_for("READY=1")
        yield Daemon(process, notify)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), WAIT)
        output = await logs
        assert CLIENT_SECRET.encode() not in output and BROKEN_KEY.encode() not in output
        notify.sock.close()


async def status_json(config: Path) -> dict[str, Any]:
    code, out, err = await command("status", "-c", str(config), "--json")
    assert code == 0, (out, err)
    [instance] = json.loads(out)["instances"]
    assert instance["running"], instance
    return {bot["name"]: bot for bot in instance["status"]["bots"]}


async def test_status_shows_each_bot_live(daemon, dingtalk, config, tmp_path):
    await ask(dingtalk, "hello status", timeout=WAIT)

    async def answered() -> dict[str, Any] | None:
        bots = await status_json(config)
        return bots if bots["helpdesk"].get("answered_today") == 1 else None

    bots = await eventually(answered, "the answer to be counted")
    helpdesk, broken = bots["helpdesk"], bots["broken"]
    assert helpdesk["state"] == "running" and helpdesk["connected_since"] > 0
    assert helpdesk["reconnects"] == 0 and helpdesk["restarts"] == 0 and helpdesk["failed_today"] == 0
    assert helpdesk["pid"] in daemon.children()
    assert helpdesk["dingtalk_calls_today"] >= 2 and helpdesk["dingtalk_calls_month"] >= 2
    assert helpdesk["dify"]["state"] == "reachable"
    assert (helpdesk["in_flight"], helpdesk["queued"]) == (0, 0)
    assert broken["state"] == "fatal"
    assert "bots[1].dify_app_api_key: refused by Dify" in broken["fatal_reason"]
    assert broken["last_exit"]["code"] == 78

    code, text, _ = await command("status", "-c", str(config))
    assert code == 0
    assert "dingdifyd@ops: running since" in text
    assert "1/2 bots connected" in text
    assert "  helpdesk: connected since" in text and "today 1 answered, 0 failed" in text
    assert "  broken: FATAL: exit 78" in text
    assert CLIENT_SECRET not in text and BROKEN_KEY not in text
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "status.sock").st_mode)
    assert mode == 0o660


async def test_status_of_a_stopped_instance_says_so_with_exit_3(daemon, config, tmp_path):
    daemon.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(daemon.process.wait(), WAIT) == 0
    assert not (tmp_path / "run" / "status.sock").exists(), "the socket outlived the daemon"
    code, text, _ = await command("status", "-c", str(config))
    assert code == 3
    assert text.startswith("dingdifyd@ops: stopped")
    code, out, _ = await command("status", "-c", str(config), "--json")
    assert code == 3 and json.loads(out)["instances"][0]["running"] is False


async def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


async def test_metrics_add_up_every_process_of_a_bot(daemon, dingtalk, port):
    await ask(dingtalk, "first", timeout=WAIT)

    async def counted(expected: float) -> dict[Any, float] | None:
        status, content_type, text = await scrape(port)
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        metrics = samples(text)
        return metrics if value(metrics, "dingdifyd_answers_total", bot="helpdesk", outcome="answered") == expected \
            else None  # fmt: skip

    metrics = await eventually(lambda: counted(1), "the first answer in the metrics")
    assert value(metrics, "dingdifyd_answer_seconds_count", bot="helpdesk") == 1
    assert value(metrics, "dingdifyd_answer_first_text_seconds_count", bot="helpdesk") == 1
    assert value(metrics, "dingdifyd_answer_seconds_bucket", bot="helpdesk", le="+Inf") == 1
    assert value(metrics, "dingdifyd_dingtalk_calls_total", bot="helpdesk", api="card.createAndDeliver",
                 result="ok") == 1  # fmt: skip
    assert (value(metrics, "dingdifyd_dingtalk_calls_total", bot="helpdesk", api="card.streaming", result="ok")
            or 0) >= 1  # fmt: skip
    assert value(metrics, "dingdifyd_bot_up", bot="helpdesk") == 1
    assert value(metrics, "dingdifyd_bot_up", bot="broken") == 0
    assert value(metrics, "dingdifyd_bot_restarts_total", bot="helpdesk") == 0
    assert value(metrics, "dingdifyd_answers_in_flight", bot="helpdesk") == 0
    labels = {label for (_, pairs) in metrics for label, _ in pairs}
    assert labels <= {"bot", "outcome", "api", "result", "kind", "le"}, labels  # no user, chat or text labels

    # a bot process killed and replaced: its counts are kept, the next process's added
    [victim] = daemon.children()
    os.kill(victim, signal.SIGKILL)
    await daemon.wait_children(exclude={victim})
    await ask(dingtalk, "second", sender_staff_id="someone-else", timeout=WAIT)
    metrics = await eventually(lambda: counted(2), "both answers in the metrics")
    assert value(metrics, "dingdifyd_bot_restarts_total", bot="helpdesk") == 1
    assert value(metrics, "dingdifyd_answer_seconds_count", bot="helpdesk") == 2

    status, _, _ = await scrape(port, "/other")
    assert status == 404


async def test_a_metrics_port_in_use_is_a_config_error_naming_the_key(tmp_path, dingtalk, dify):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path / "c.yaml", dingtalk, dify, metrics_listen=f"127.0.0.1:{port}",
                            status_socket=str(tmp_path / "status.sock"))  # fmt: skip
        code, _, err = await command("run", "-c", str(path))
    assert code == 78
    assert f"metrics_listen: 127.0.0.1:{port} is already in use" in err
    assert "Traceback" not in err
