"""The user's Dify protected from bursts, end to end: bursts of people against a fake Dify whose database
pool is bounded like a stock Dify's, a flood from one person, a Dify that fails, bots sharing one Dify."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dingdifyd.bridge.run_reading import QUEUED
from dingdifyd.errors import DifyOverloaded
from dingdifyd.pacing.circuit import CircuitSettings, CircuitState
from dingdifyd.simulator.dify import FakeDify, start_fake_dify
from dingdifyd.simulator.dingtalk import FakeCard, FakeDingTalk
from dingdifyd.store.slots import SqliteSlots
from tests.integration.harness import bot_entry, dify_key, echo, push, running_bot, write_config
from tests.integration.redis_server import redis_server

pytestmark = pytest.mark.timeout(90)
WAIT = 60.0


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    """A stock Dify's database pool (30 + 10 connections), with a short pool timeout so failures come soon."""
    fake = await start_fake_dify(default_apps=True, db_pool=40, db_pool_timeout=3.0)
    fake.configure(dify_key("chatbot"), token_delay=0.02, slow_token_delay=0.1)
    yield fake
    await fake.close()


async def finals(dingtalk: FakeDingTalk, tracks: list[str]) -> list[FakeCard]:
    await dingtalk.wait_for(lambda: all(t in dingtalk.cards and dingtalk.cards[t].done for t in tracks), WAIT,
                            "every card to end")  # fmt: skip
    return [dingtalk.cards[t] for t in tracks]


async def test_fifty_people_at_once_are_all_answered_and_difys_pool_is_never_exhausted(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), first_token_delay=0.3)  # a model's latency: the fifty overlap
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):  # the default bound
        tracks = [push(dingtalk, f"question {i}", sender_staff_id=f"person{i}") for i in range(50)]
        cards = await finals(dingtalk, tracks)
    for index, card in enumerate(cards):
        assert not card.failed and card.final_content == echo(f"question {index}")
    assert dify.db_pool_timeouts == 0  # no request of ours ever waited out Dify's pool
    assert dify.max_generations_in_flight <= 10  # dify_max_concurrency's default
    waited = [card for card in cards if any(c.startswith("⏳ Queued:") for c in card.contents)]
    assert waited, "the answers that waited said so in their cards"
    for card in waited:
        shown = [int(c.split(": ")[1].split()[0]) for c in card.contents if c.startswith("⏳ Queued:")]
        assert shown == sorted(shown, reverse=True) and len(shown) == len(set(shown))  # only when it changes
    assert QUEUED.format(ahead=0).split(":")[0] in "".join(waited[0].contents)


async def test_one_persons_flood_does_not_starve_the_next_person(tmp_path, dingtalk, dify):
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, dify_max_concurrency=1)
    dify.configure(dify_key("chatbot"), token_delay=0.03)  # an answer takes over half a second
    async with running_bot(config) as bot:
        flood = []
        for index in range(6):
            flood.append(push(dingtalk, f"question {index}", sender_staff_id="flooder"))
            pushed = len(flood)
            await dingtalk.wait_for(lambda pushed=pushed: len(dingtalk.acks) >= pushed, WAIT, "the ACK")
        other = push(dingtalk, "my one question", sender_staff_id="someone")
        # `dingdifyd status` counts the answers waiting for their turn at the Dify as queued
        await dingtalk.wait_for(lambda: bot.report()["status"]["queued"] >= 5, WAIT, "the queue in the status")
        await finals(dingtalk, [*flood, other])
    asked = [request.json["query"] for request in dify.requests_to("/chat-messages")]
    # the flooder's first was running and its second had its turn; then the other person's, not the flood's rest
    assert asked.index("my one question") <= 2, asked
    assert dify.max_generations_in_flight == 1


async def test_waiting_for_a_turn_counts_toward_no_dify_timeout(tmp_path, dingtalk, dify):
    dify.configure(dify_key("chatbot"), token_delay=0.05)  # each answer takes about a second
    config = write_config(tmp_path / "c.yaml", dingtalk, dify, dify_max_concurrency=1, dify_total_timeout=1.5,
                          dify_first_byte_timeout=1.5)  # fmt: skip
    async with running_bot(config):
        tracks = [push(dingtalk, f"patience {i}", sender_staff_id=f"p{i}") for i in range(3)]
        cards = await finals(dingtalk, tracks)
    # the last waited two answers' time, more than the 1.5 s any answer may take: its own time counts, not that
    for index, card in enumerate(cards):
        assert not card.failed and card.final_content == echo(f"patience {index}")
    assert any(c.startswith("⏳ Queued: 1 ahead") for card in cards for c in card.contents)


async def test_a_dify_failing_before_the_answer_is_asked_once_more(tmp_path, dingtalk, dify):
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify)):
        dify.next_request(dify_key("chatbot"), http_500=True)
        (card,) = await finals(dingtalk, [push(dingtalk, "second time lucky")])
    assert not card.failed and card.final_content == echo("second time lucky")
    assert len(dify.requests_to("/chat-messages")) == 2


async def test_a_failing_dify_is_left_alone_people_are_told_at_once_and_a_probe_brings_it_back(
    tmp_path, dingtalk, dify
):
    circuit = {"circuit": CircuitSettings(min_requests=2, failure_ratio=0.5, open_for=0.5, max_open_for=1.0)}
    async with running_bot(write_config(tmp_path / "c.yaml", dingtalk, dify), dify_protection=circuit) as bot:
        protection = bot.protections.for_url(dify.base_url)
        dify.configure(dify_key("chatbot"), http_500=True)  # down (a proxy's 500s, a dead pool)
        (first,) = await finals(dingtalk, [push(dingtalk, "one")])  # asked, and asked once more: both fail
        assert protection.circuit.state is CircuitState.OPEN
        asked = len(dify.requests_to("/chat-messages"))
        (second,) = await finals(dingtalk, [push(dingtalk, "two")])
        assert len(dify.requests_to("/chat-messages")) == asked  # not asked at all: told at once
        dify.configure(dify_key("chatbot"), http_500=False)  # back
        await dingtalk.wait_for(lambda: protection.circuit.retry_after() == 0, WAIT, "the cool-down to end")
        (third,) = await finals(dingtalk, [push(dingtalk, "three")])  # the probe
    assert first.failed and asked == 2
    assert second.failed and DifyOverloaded.user_message in second.final_content
    assert not third.failed and third.final_content == echo("three")
    assert protection.circuit.state is CircuitState.CLOSED


async def test_two_bots_on_one_dify_share_its_bound(tmp_path, dify):
    dingtalk = FakeDingTalk(ping_interval=None, redeliver_after=None, rate_limit=None)
    for client_id in ("dingbot-a", "dingbot-b"):
        dingtalk.register_app(client_id, "secret-of-the-two-bots")
    async with dingtalk:
        bots = [bot_entry(name, client_id=f"ding{name}", client_secret="secret-of-the-two-bots")
                for name in ("bot-a", "bot-b")]  # fmt: skip
        config = write_config(tmp_path / "c.yaml", dingtalk, dify, bots=bots, dify_max_concurrency=3)
        # two bot processes' worth: each its own runtime, store and slot table handle, one state directory
        async with running_bot(config, "bot-a"), running_bot(config, "bot-b"):
            tracks = [push(dingtalk, f"q{i}", client_id=f"dingbot-{'ab'[i % 2]}", sender_staff_id=f"p{i}")
                      for i in range(20)]  # fmt: skip
            cards = await finals(dingtalk, tracks)
    assert all(not card.failed for card in cards)
    assert dify.max_generations_in_flight <= 3  # one bound for both, not 3 each


# --- the slot tables ---------------------------------------------------------------------------------------


def test_slots_of_a_killed_process_are_freed_at_once(tmp_path):
    path = tmp_path / "dify-slots.sqlite3"
    pid = os.fork()
    if pid == 0:  # another bot process: takes two slots and is killed holding them
        try:
            table = SqliteSlots(path)
            assert table.try_acquire("http://dify/v1", 2, 1.0) and table.try_acquire("http://dify/v1", 2, 1.0)
            Path(f"{path}.ready").touch()
            signal.pause()
        finally:
            os._exit(0)
    try:
        here = SqliteSlots(path)
        for _ in range(1000):
            if Path(f"{path}.ready").exists():
                break
            time.sleep(0.01)
        assert here.try_acquire("http://dify/v1", 2, 2.0) is None  # both taken by the other process
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert here.try_acquire("http://dify/v1", 2, 2.0) is not None  # kill -9: its slots are free at once
    assert here.try_acquire("http://dify/v1", 2, 2.0) is not None
    assert here.try_acquire("http://dify/v1", 2, 2.0) is None
    here.close()


def test_hosts_on_one_redis_share_a_difys_slots_and_the_longest_waiting_goes_first(tmp_path):
    from dingdifyd.store.redis_store import RedisStore

    with redis_server(tmp_path) as server:
        host_a, host_b = RedisStore(server.url, "helpdesk"), RedisStore(server.url, "hr")  # two bots, two hosts
        slots_a, slots_b = host_a.dify_slots(), host_b.dify_slots()
        base = "http://dify.example.com/v1"
        try:
            held = [slots_a.try_acquire(base, 3, 1.0) for _ in range(2)]
            assert all(held) and slots_b.try_acquire(base, 3, 2.0) is not None
            assert slots_a.try_acquire(base, 3, 3.0) is None  # three in flight, whoever holds them
            assert slots_b.try_acquire(base, 3, 2.5) is None  # B waits since 2.5, A since 3.0
            slots_a.release(base, held[0])
            assert slots_a.try_acquire(base, 3, 3.0) is None  # free, but B has waited longer
            assert slots_b.try_acquire(base, 3, 2.5) is not None
            slots_b.stop_waiting(base)
            other = slots_a.try_acquire("http://another-dify/v1", 3, 4.0)
            assert other is not None  # another Dify, another bound
        finally:
            host_a.close()
            host_b.close()


def test_a_dead_hosts_slots_are_freed_when_their_lease_ends(tmp_path):
    from dingdifyd.store.redis_store import RedisSlots, RedisStore

    with redis_server(tmp_path) as server:
        gone, alive = RedisStore(server.url, "helpdesk"), RedisStore(server.url, "helpdesk")
        base = "http://dify.example.com/v1"
        short = RedisSlots(gone, lease=0.2)  # the host that dies: it renews nothing from now on
        try:
            assert short.try_acquire(base, 1, 1.0) is not None
            survivor = alive.dify_slots()
            assert survivor.try_acquire(base, 1, 2.0) is None
            deadline = time.monotonic() + 10
            while (slot := survivor.try_acquire(base, 1, 2.0)) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slot is not None
        finally:
            gone.close()
            alive.close()
