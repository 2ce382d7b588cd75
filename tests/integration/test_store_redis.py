"""The redis store against a real redis-server: what several hosts share, leases on answers in flight, and
what happens when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dingdifyd.errors import ConfigError, StoreUnavailable
from dingdifyd.store import open_store
from dingdifyd.store.base import InFlight
from dingdifyd.worker.adoption import tend_shared_store
from tests.integration.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


def store(server: RedisServer, bot: str = "helpdesk", **options):
    from dingdifyd.store.redis_store import RedisStore

    return RedisStore(server.url, bot, **options)


def record(key: str, attempts: int = 1) -> InFlight:
    return InFlight(key, {"msg_id": key, "text": "hello"}, f"track-{key}", attempts)


async def eventually(predicate, timeout: float = 5.0, what: str = "a condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def test_open_store_picks_redis_for_a_redis_url(redis_service, tmp_path):
    opened = open_store(redis_service.url, str(tmp_path), "helpdesk")
    try:
        assert opened.shared is True
        assert opened.claim_message("robot:m1")
    finally:
        opened.close()


def test_a_message_is_claimed_once_across_hosts_even_when_they_race(redis_service):
    host_a, host_b = store(redis_service), store(redis_service)
    keys = [f"robot:msg{i}" for i in range(200)]
    # both hosts claim every message at once, as a redelivery racing the first delivery would
    with ThreadPoolExecutor(max_workers=8) as pool:
        won_a = list(pool.map(host_a.claim_message, keys))
        won_b = list(pool.map(host_b.claim_message, keys))
    assert all(a != b for a, b in zip(won_a, won_b, strict=True))  # exactly one host won each message
    assert host_a.claim_message(keys[0]) is False  # and later redeliveries are refused by everyone
    host_a.close()
    host_b.close()


async def test_conversations_are_shared_and_expire(redis_service):
    host_a, host_b = store(redis_service), store(redis_service)
    host_a.set_conversation("helpdesk|single|u1", "conv-1", ttl=60)
    assert host_b.get_conversation("helpdesk|single|u1") == "conv-1"
    host_b.forget_conversation("helpdesk|single|u1")
    assert host_a.get_conversation("helpdesk|single|u1") is None
    host_a.set_conversation("helpdesk|single|u2", "conv-2", ttl=0.2)
    await eventually(lambda: host_b.get_conversation("helpdesk|single|u2") is None, what="the expiry")
    # another bot on the same Redis has its own keys
    other_bot = store(redis_service, bot="hr")
    host_a.set_conversation("same-key", "conv-helpdesk", ttl=60)
    assert other_bot.get_conversation("same-key") is None
    for s in (host_a, host_b, other_bot):
        s.close()


def test_a_conversation_kept_zero_minutes_is_not_kept(redis_service):
    host = store(redis_service)
    try:
        host.set_conversation("helpdesk|single|u1", "conv-1", ttl=0)
        assert host.get_conversation("helpdesk|single|u1") is None  # 0: a new conversation every message
        host.set_conversation("helpdesk|single|u1", "conv-2", ttl=60)
        host.set_conversation("helpdesk|single|u1", "conv-3", ttl=0)
        assert host.get_conversation("helpdesk|single|u1") is None
    finally:
        host.close()


async def test_a_live_hosts_answers_are_never_adopted_a_dead_ones_once(redis_service):
    host_a = store(redis_service, lease_ttl=0.3)
    host_a.begin_answer(record("robot:m1"))
    host_b, host_c = store(redis_service), store(redis_service)
    assert host_b.unfinished_answers() == []  # A is alive (its lease is fresh): hands off
    host_a.keep_alive()
    assert host_c.unfinished_answers() == []
    # A crashes: nobody renews its lease; once it lapses, exactly one of B and C adopts the answer
    await eventually(lambda: not host_b._owners_alive([host_a.consumer_id])[0], what="A's lease to lapse")
    adopted_b = host_b.unfinished_answers()
    adopted_c = host_c.unfinished_answers()
    assert [r.message_key for r in adopted_b + adopted_c] == ["robot:m1"]
    adopter = host_b if adopted_b else host_c
    # the adopter owns it now and is alive: the other one leaves it alone, even later
    assert (host_c if adopted_b else host_b).unfinished_answers() == []
    adopter.end_answer("robot:m1")
    assert host_b.unfinished_answers() == [] and host_c.unfinished_answers() == []
    for s in (host_b, host_c):
        s.close()


async def test_counters_are_shared_and_expire(redis_service):
    host_a, host_b = store(redis_service), store(redis_service)
    assert host_a.counter("calls:2026-06") == 0
    assert host_a.incr("calls:2026-06") == 1
    assert host_b.incr("calls:2026-06", 4) == 5
    assert host_a.counter("calls:2026-06") == 5
    host_a.incr("calls:today", expire=0.3)
    host_b.incr("calls:today", expire=3600)  # the first increment's expiry stays
    await eventually(lambda: host_b.counter("calls:today") == 0, what="the counter to expire")
    host_a.close()
    host_b.close()


def test_a_graceful_stop_leaves_nothing_locked(redis_service):
    host_a, host_b = store(redis_service), store(redis_service)
    host_a.begin_answer(record("robot:left-over", attempts=2))
    assert host_b.peers() == [host_a.consumer_id]
    host_a.close()  # its lease goes with it: what it left is adoptable at once
    assert host_b.peers() == []
    (adopted,) = host_b.unfinished_answers()
    assert adopted == record("robot:left-over", attempts=2)
    host_b.close()


async def test_tending_adopts_the_answers_of_a_process_that_died(redis_service):
    crashed = store(redis_service, lease_ttl=0.2)
    crashed.begin_answer(record("robot:orphan"))
    survivor = store(redis_service)
    adopted: list[str] = []

    def adopt() -> int:
        found = survivor.unfinished_answers()
        adopted.extend(r.message_key for r in found)
        return len(found)

    tending = asyncio.create_task(tend_shared_store(survivor, adopt, interval=0.05))
    try:
        await eventually(lambda: adopted, what="the adoption")
        assert adopted == ["robot:orphan"]
    finally:
        tending.cancel()
        survivor.close()


async def test_without_redis_the_bot_answers_degraded_and_recovers(redis_service, caplog):
    caplog.set_level(logging.INFO, logger="dingdifyd")
    host = store(redis_service, retry_after=0.1)
    host.set_conversation("s", "conv", ttl=60)
    redis_service.stop()
    # unreachable: what can degrade does (nothing is known, nothing breaks); what matters raises, so that the
    # caller keeps it: the bridge grants such a claim (answering without shared state) and replays the record
    assert host.grants_claims_when_unreachable
    with pytest.raises(StoreUnavailable):
        host.claim_message("robot:during-outage", record("robot:during-outage"))
    assert host.get_conversation("s") is None
    with pytest.raises(StoreUnavailable):
        host.begin_answer(record("robot:during-outage"))
    with pytest.raises(StoreUnavailable):
        host.end_answer("robot:during-outage")
    assert host.unfinished_answers() == []
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "without shared state" in r.getMessage()]
    assert len(errors) == 1  # said once per outage, not once per call
    redis_service.start()  # same port, empty (no persistence)
    await eventually(lambda: claims(host, "robot:after") and host.get_conversation("s") is None
                     and not host._down, what="the store to come back")  # fmt: skip
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    host.set_conversation("s", "conv-2", ttl=60)
    assert host.get_conversation("s") == "conv-2"
    host.close()


def test_a_redis_that_hangs_costs_one_timeout_not_one_per_call():
    pytest.importorskip("redis")
    from dingdifyd.store.redis_store import RedisStore

    # a server that accepts connections and never answers: every call that reached it would hang 1 s
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)
        black_hole.setblocking(False)
        port = black_hole.getsockname()[1]
        host = RedisStore(f"redis://127.0.0.1:{port}/0", "helpdesk", retry_after=300)  # its ping times out
        for _ in range(100):
            with pytest.raises(StoreUnavailable):
                host.claim_message("robot:m")
            assert host.get_conversation("s") is None
        connections = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                black_hole.accept()[0].close()
                connections += 1
    assert connections == 1  # the first timeout opened the breaker: no retries, no call per message


def test_a_refused_password_is_a_configuration_error_that_hides_it(tmp_path):
    with redis_server(tmp_path, password="right-password-123") as server:
        wrong = server.url.replace("right-password-123", "wrong-password-456")
        with pytest.raises(ConfigError) as refused:
            store_for(wrong)
        assert "wrong-password-456" not in str(refused.value)
        assert "***" in str(refused.value)
        good = store_for(server.url)
        assert good.claim_message("robot:m")
        good.close()


def claims(host, key: str) -> bool:
    """Whether `host` claimed `key` now (False while Redis cannot be reached)."""
    try:
        return host.claim_message(key)
    except StoreUnavailable:
        return False


def store_for(url: str):
    from dingdifyd.store.redis_store import RedisStore

    return RedisStore(url, "helpdesk")


def test_a_password_in_the_query_never_reaches_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="dingdifyd")
    with redis_server(tmp_path, password="query-password-789") as server:
        url = f"redis://127.0.0.1:{server.port}/0?password=query-password-789"
        host = store_for(url)
        try:
            assert host.claim_message("robot:m")
        finally:
            host.close()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "store: redis://127.0.0.1" in logged  # the INFO line naming the store is there ...
    assert "query-password-789" not in logged  # ... without the password

