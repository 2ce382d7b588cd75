"""Benchmarks of the real daemon against the simulators on loopback. Prints figures; asserts nothing about time.

    .venv/bin/python bench/run.py            # every scenario, a markdown table at the end
    .venv/bin/python bench/run.py latency    # one or more scenarios by name
    .venv/bin/python bench/run.py dify_burst --dify-url https://dify.example.com/v1 --dify-key app-...
                                             # the burst against a real Dify (its chatbot app) instead
    .venv/bin/python bench/run.py dify_burst --daemon-src /path/to/older/checkout
                                             # the daemon of another checkout (a before/after comparison)

The daemon runs as `python -m dingdifyd run` (supervisor + bot processes, a real NOTIFY_SOCKET); the fake DingTalk
and fake Dify run in this process. CPU and memory of the daemon's processes are read from /proc. The simulators
share the machine's cores with the daemon, so the figures are an upper bound of what the daemon alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dingdifyd.bridge.session import out_track_id  # noqa: E402
from dingdifyd.dingtalk.stream import parse_incoming  # noqa: E402
from dingdifyd.simulator.configfile import bot_entry, write_config  # noqa: E402
from dingdifyd.simulator.dify import FakeDify, start_fake_dify  # noqa: E402
from dingdifyd.simulator.dingtalk import FakeCard, FakeDingTalk  # noqa: E402

CLIENT_SECRET = "bench-secret"
DIFY_KEY = "app-fake-chatbot"
TICKS = os.sysconf("SC_CLK_TCK")


def client_id(index: int) -> str:
    return f"dingbench{index:04d}"


# --- /proc readings -------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --- one running daemon ---------------------------------------------------------------------------------------


@dataclass
class Options:
    dify_url: str | None = None  # a real Dify instead of the simulator (dify_burst)
    dify_key: str = ""
    dify_type: str = "chatbot"
    daemon_src: str | None = None  # run the daemon from this source tree


OPTIONS = Options()


@dataclass
class Rig:
    dingtalk: FakeDingTalk
    dify: FakeDify
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    ready_after: float = 0.0
    notify_fields: list[str] = field(default_factory=list)
    dify_url: str | None = None  # a real Dify: its URL, key and app type replace the simulator's
    dify_key: str = DIFY_KEY
    dify_type: str = "chatbot"

    @property
    def bot_pids(self) -> list[int]:
        assert self.process is not None
        return children(self.process.pid)

    async def start_daemon(self, bots: int = 1, **top: object) -> None:
        entries = [
            bot_entry(f"bot{i}", client_id=client_id(i), client_secret=CLIENT_SECRET, app_type=self.dify_type,
                      dify_key=self.dify_key)
            for i in range(bots)
        ]  # fmt: skip
        for i in range(bots):
            self.dingtalk.register_app(client_id(i), CLIENT_SECRET)
        config = write_config(
            self.workdir / "bench.yaml", dingtalk_url=self.dingtalk.base_url,
            dify_url=self.dify_url or self.dify.base_url, state_dir=self.workdir / "state", bots=entries,
            log_level="WARNING", **top,
        )  # fmt: skip
        sock_path = str(self.workdir / "notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(sock_path)
        notify.setblocking(False)
        env = {**os.environ, "NOTIFY_SOCKET": sock_path, "NO_PROXY": "127.0.0.1,localhost"}
        if OPTIONS.daemon_src:
            env["PYTHONPATH"] = os.pathsep.join([OPTIONS.daemon_src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dingdifyd", "run", "-c", str(config), env=env,
            stderr=(self.workdir / "daemon.log").open("wb"),
            cwd=self.workdir,  # not this checkout: `-m` would import the daemon from the working directory
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        while "READY=1" not in self.notify_fields:
            data = await asyncio.wait_for(loop.sock_recv(notify, 65536), 60)
            self.notify_fields.extend(data.decode().split("\n"))
        self.ready_after = time.monotonic() - started
        notify.close()

    async def stop_daemon(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 60)

    def push(self, text: str, staff: str, bot: int = 0, **kwargs: object) -> str:
        data = self.dingtalk.make_text_message(text, sender_staff_id=staff, client_id=client_id(bot), **kwargs)
        message = parse_incoming(data)
        assert message is not None
        self.dingtalk.push_message(client_id(bot), data)
        return out_track_id(message)

    async def wait_cards(self, tracks: list[str], done: Callable[[FakeCard], bool], timeout: float) -> None:
        await self.dingtalk.wait_for(
            lambda: all(t in self.dingtalk.cards and done(self.dingtalk.cards[t]) for t in tracks), timeout, "cards"
        )


async def rig(rate_limit: float | None, **dify_options: object) -> Rig:
    dingtalk = FakeDingTalk(ping_interval=None, redeliver_after=None, rate_limit=rate_limit)
    await dingtalk.start()
    dify = await start_fake_dify(default_apps=True, **dify_options)
    return Rig(dingtalk, dify, Path(tempfile.mkdtemp(prefix="dingdifyd-bench-")))


async def close(r: Rig) -> None:
    await r.stop_daemon()
    await r.dify.close()
    await r.dingtalk.close()


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# --- scenarios ------------------------------------------------------------------------------------------------

Results = list[tuple[str, str, str]]  # (figure, value, target)


async def footprint(results: Results) -> None:
    for bots in (1, 10):
        r = await rig(None)
        try:
            await r.start_daemon(bots=bots)
            await asyncio.sleep(2)  # let imports and first allocations settle
            assert r.process is not None
            results.append((f"start to READY=1, {bots} bot(s)", f"{r.ready_after:.2f} s", "≤ 2 s for 10"))
            if bots == 1:
                results.append(("RSS of the supervisor", f"{memory_mb(r.process.pid):.1f} MB", "≤ 40 MB"))
                results.append(("RSS of an idle bot process", f"{memory_mb(r.bot_pids[0]):.1f} MB", "≤ 70 MB"))
        finally:
            await close(r)


UNPACED = 1e6  # dingtalk_card_qps when the simulator's limit is lifted: the daemon is measured, not DingTalk


async def latency(results: Results) -> None:
    """From the moment the fake Dify writes a conversation's first text to the moment that text reaches the
    fake DingTalk. The model takes 0.3 s to its first token, as real ones do, so the card exists by then; the
    conversations start spread over one second, as people's messages are."""
    for n in (1, 50, 200):
        r = await rig(None)
        try:
            r.dify.configure(DIFY_KEY, token_delay=0.05, first_token_delay=0.3, answer=words(20))
            await r.start_daemon(dingtalk_card_qps=UNPACED)
            tracks = {}
            for i in range(n):
                tracks[f"lat{n}-{i}"] = r.push("latency", f"lat{n}-{i}")
                await asyncio.sleep(1.0 / n)
            await r.wait_cards(list(tracks.values()), lambda c: c.done, 120)
            added = []
            for staff, track in tracks.items():
                card = r.dingtalk.cards[track]
                user = next(u for u in r.dify.first_text_at if u.endswith(":" + staff))
                assert card.first_text_at is not None
                added.append((card.first_text_at - r.dify.first_text_at[user]) * 1000)
            results.append((
                f"added latency, {n} conversations (p50 / p99)",
                f"{statistics.median(added):.1f} / {pct(added, 99):.1f} ms",
                "p50 ≤ 5, p99 ≤ 25 ms at 200",
            ))  # fmt: skip
        finally:
            await close(r)


async def concurrency(results: Results) -> None:
    answer = words(100)  # 100 tokens over 5 s
    largest_ok = 0
    for n in (250, 500, 1000, 1500):
        r = await rig(None)
        try:
            r.dify.configure(DIFY_KEY, token_delay=0.05, answer=answer)
            await r.start_daemon(dingtalk_card_qps=UNPACED)
            (bot,) = r.bot_pids
            cpu0, t0 = cpu_seconds(bot), time.monotonic()
            tracks = [r.push("load", f"c{n}-{i}") for i in range(n)]
            try:
                await r.wait_cards(tracks, lambda c: c.done, 180)
            except TimeoutError:
                results.append((f"{n} conversations", "not all cards final in 180 s", "all final, exact"))
                break
            wall = time.monotonic() - t0
            cpu = cpu_seconds(bot) - cpu0
            exact = sum(r.dingtalk.cards[t].final_content == answer for t in tracks)
            peak = memory_mb(bot, "VmHWM")
            holds = exact == n and cpu / wall < 1.0 and peak < 150
            largest_ok = n if holds else largest_ok
            results.append((
                f"{n} conversations × 100 tokens / 5 s",
                f"{exact}/{n} exact, bot CPU {100 * cpu / wall:.0f}% of a core, peak RSS {peak:.0f} MB, {wall:.1f} s",
                "all exact, < 1 core, < 150 MB",
            ))  # fmt: skip
            results.append((
                f"CPU per 1000 streamed tokens ({n} conv.)", f"{1000 * cpu / (n * 100) * 1000:.1f} ms", "",
            ))  # fmt: skip
            if not holds:
                break
        finally:
            await close(r)
    results.append(("largest N that holds (of 250/500/1000/1500)", str(largest_ok), "≥ 1000"))


async def rate_limited(results: Results) -> None:
    for n in (30, 100):
        r = await rig(20.0)
        try:
            r.dify.configure(DIFY_KEY, token_delay=0.05, answer=words(40))
            await r.start_daemon()
            t0 = time.monotonic()
            tracks = [r.push("limited", f"r{n}-{i}") for i in range(n)]
            await r.wait_cards(tracks, lambda c: c.first_text_at is not None, 300)
            first = time.monotonic() - t0
            await r.wait_cards(tracks, lambda c: c.done, 300)
            final = time.monotonic() - t0
            rejected = sum(r.dingtalk.qps_rejections.values())
            exact = sum(r.dingtalk.cards[t].final_content == words(40) for t in tracks)
            results.append((
                f"20 calls/s limit, {n} conversations: every card shows text / is final",
                f"{first:.1f} s / {final:.1f} s ({exact}/{n} exact, {rejected} × 403)",
                f"floor {n / 20:.1f} s / {max(n / 20, 40 * 0.05):.1f} s",
            ))  # fmt: skip
        finally:
            await close(r)


async def economy(results: Results) -> None:
    r = await rig(20.0)
    try:
        r.dify.configure(DIFY_KEY, token_delay=0.1, answer=words(100))  # a 10 s answer
        await r.start_daemon()
        before = sum(r.dingtalk.calls.values())
        track = r.push("economy", "econ")
        await r.wait_cards([track], lambda c: c.done, 60)
        calls = sum(r.dingtalk.calls.values()) - before - r.dingtalk.calls.get("oauth2.accessToken", 0)
        results.append(("DingTalk calls for one 10 s answer (defaults)", str(calls), "≤ 2 + 10 / 0.5 = 22"))
    finally:
        await close(r)


async def recovery(results: Results) -> None:
    r = await rig(None)
    try:
        r.dify.configure(DIFY_KEY, token_delay=0.002, answer=words(5))
        await r.start_daemon(restart_delay_min=0.1)
        await r.wait_cards([r.push("warm up", "rec")], lambda c: c.done, 30)
        (bot,) = r.bot_pids
        t0 = time.monotonic()
        os.kill(bot, signal.SIGKILL)
        # the person writes as soon as DingTalk has noticed; it holds the message until a connection takes it
        await r.dingtalk.wait_for(lambda: r.dingtalk.connections == 0, 10, "the dead connection to close")
        track = r.push("after kill", "rec")
        await r.wait_cards([track], lambda c: c.done, 60)
        elapsed = time.monotonic() - t0
        results.append(("kill -9 of the bot process → next message answered", f"{elapsed:.2f} s", "≤ 2 s"))
        t0 = time.monotonic()
        r.dingtalk.drop_connections()
        await r.dingtalk.wait_for(lambda: r.dingtalk.connections == 0, 10, "the dropped connection to close")
        track = r.push("after drop", "rec")
        await r.wait_cards([track], lambda c: c.done, 60)
        results.append(("WebSocket drop → next message answered", f"{time.monotonic() - t0:.2f} s", ""))
    finally:
        await close(r)


STOCK_POOL = {"db_pool": 40, "db_pool_timeout": 30.0}  # SQLALCHEMY_POOL_SIZE 30 + MAX_OVERFLOW 10, TIMEOUT 30


async def dify_burst(results: Results) -> None:
    """N people write at the same moment, against a Dify whose database pool is a stock one's (the simulator
    with db_pool, or a real Dify given by --dify-url). The model takes 1 s to its first token and streams 20
    more over 1 s. Measured: answers that reached their card whole, cards that ended with an error, the time
    until every card was final, and what the Dify saw."""
    for n in (50, 200):
        r = await rig(None, **STOCK_POOL)
        if OPTIONS.dify_url:
            r.dify_url, r.dify_key, r.dify_type = OPTIONS.dify_url, OPTIONS.dify_key, OPTIONS.dify_type
        try:
            r.dify.configure(DIFY_KEY, first_token_delay=1.0, token_delay=0.05, answer=words(20))
            await r.start_daemon(dingtalk_card_qps=UNPACED)
            t0 = time.monotonic()
            tracks = [r.push(f"burst {i}", f"burst{n}-{i}") for i in range(n)]
            try:
                await r.wait_cards(tracks, lambda c: c.done, 600)
                wall = f"{time.monotonic() - t0:.1f} s"
            except TimeoutError:
                wall = "not all final in 600 s"
            cards = [r.dingtalk.cards.get(t) for t in tracks]
            failed = sum(1 for c in cards if c is not None and c.done and c.failed)
            if OPTIONS.dify_url:
                answered = sum(1 for c in cards if c is not None and c.done and not c.failed)
                seen = "a real Dify"
            else:
                answered = sum(1 for c in cards if c is not None and c.final_content == words(20))
                seen = (f"at most {r.dify.max_generations_in_flight} streaming at once, "
                        f"{r.dify.db_pool_timeouts} × 500 (pool)")  # fmt: skip
            queued = sum(1 for c in cards if c is not None and any(x.startswith("⏳ Queued") for x in c.contents))
            results.append((
                f"{n} people at once, " + (f"the Dify at {OPTIONS.dify_url}" if OPTIONS.dify_url
                                            else "simulated Dify with a stock pool (30 + 10)"),
                f"{answered}/{n} answered, {failed} failed, all final after {wall}; {queued} cards showed a "
                f"place; {seen}",
                f"{n}/{n} answered",
            ))  # fmt: skip
        finally:
            await close(r)


SCENARIOS = {
    "footprint": footprint,
    "latency": latency,
    "concurrency": concurrency,
    "rate_limited": rate_limited,
    "economy": economy,
    "recovery": recovery,
    "dify_burst": dify_burst,
}


async def main(names: list[str]) -> None:
    results: Results = []
    for name in names or list(SCENARIOS):
        print(f"… {name}", file=sys.stderr, flush=True)
        await SCENARIOS[name](results)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    print(f"\nMachine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, simulators in-process.\n")
    print("| figure | measured | target |\n|---|---|---|")
    for figure, value, target in results:
        print(f"| {figure} | {value} | {target} |")


def parse_arguments(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(description="dingdifyd benchmarks (figures, no assertions)")
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], metavar="SCENARIO",  # []: none given
                        help=f"any of: {', '.join(SCENARIOS)} (default: all)")  # fmt: skip
    parser.add_argument("--dify-url", help="dify_burst against this real Dify (Service API base, with /v1)")
    parser.add_argument("--dify-key", default=os.environ.get("DIFY_APP_API_KEY", ""),
                        help="its app's API key (or env DIFY_APP_API_KEY)")  # fmt: skip
    parser.add_argument("--dify-type", default="chatbot", help="its app's type (default chatbot)")
    parser.add_argument("--daemon-src", help="run the daemon of this source tree (e.g. an older checkout)")
    args = parser.parse_args(argv)
    if args.dify_url and not args.dify_key:
        parser.error("--dify-url needs --dify-key (or DIFY_APP_API_KEY)")
    OPTIONS.dify_url, OPTIONS.dify_key, OPTIONS.dify_type = args.dify_url, args.dify_key, args.dify_type
    OPTIONS.daemon_src = args.daemon_src
    return list(args.scenarios)


if __name__ == "__main__":
    asyncio.run(main(parse_arguments(sys.argv[1:])))
