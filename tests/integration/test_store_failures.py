"""A store that fails must cost no message and repeat no answer: a locked or full disk, a Redis that blips, a
lease that cannot be renewed. Real SQLite locks, a real tmpfs filled up, a real redis-server behind a real
TCP proxy that can refuse connections; the bot end to end against the simulators."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sqlite3
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dingdifyd import config
from dingdifyd.bridge.ledger import AnswerLedger
from dingdifyd.bridge.service import CANNOT_TAKE_MESSAGES
from dingdifyd.bridge.session import out_track_id
from dingdifyd.dingtalk.stream import parse_incoming
from dingdifyd.errors import StoreUnavailable
from dingdifyd.simulator.dify import FakeDify, start_fake_dify
from dingdifyd.store.base import InFlight
from dingdifyd.store.disk import DiskStore
from tests.integration.harness import CLIENT_ID, dify_key, echo, fake_dingtalk, running_bot, write_config
from tests.integration.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(90)
WAIT = 30.0


@pytest.fixture
async def dify() -> AsyncIterator[FakeDify]:
    fake = await start_fake_dify(default_apps=True)
    fake.configure(dify_key("chatbot"), token_delay=0.002, slow_token_delay=0.1)
    yield fake
    await fake.close()


def record(key: str) -> InFlight:
    return InFlight(key, {"msg_id": key, "text": "hello"}, f"track-{key}", 1)


# --- the disk store -------------------------------------------------------------------------------------------


def test_a_claim_and_its_answer_in_flight_are_one_write(tmp_path):
    store = DiskStore(tmp_path / "bot")
    try:
        assert store.claim_message("robot:m1", record("robot:m1")) is True
        assert store.unfinished_answers() == [record("robot:m1")]  # no second write to lose in a crash
        assert store.claim_message("robot:m1", dataclasses.replace(record("robot:m1"), attempts=9)) is False
        assert store.unfinished_answers() == [record("robot:m1")]  # a redelivery changes nothing
        store.end_answer("robot:m1")
        assert store.unfinished_answers() == []
    finally:
        store.close()


async def test_a_locked_store_costs_no_message_and_tells_the_person_once(tmp_path, dify, caplog):
    caplog.set_level(logging.INFO)
    async with fake_dingtalk(redeliver_after=0.3) as dingtalk:  # DingTalk delivers again what is not ACKed
        path = write_config(tmp_path / "c.yaml", dingtalk, dify)
        bot = config.load(path, environ={}).bot("helpdesk")
        store = DiskStore(Path(bot.state_dir) / bot.name, timeout=0.05)
        lock = sqlite3.connect(Path(bot.state_dir) / bot.name / "state" / "cache.db", isolation_level=None)
        options = {"store_outage_notice_after": 0}
        async with running_bot(path, store=store, bridge_options=options, late_delivery_after=0.2) as runtime:
            lock.execute("BEGIN EXCLUSIVE")  # another process holds the database: nothing can be written
            data = dingtalk.make_text_message("asked while the store is locked")
            data["createAt"] += 10  # ms: written while connected, for sure (its clock reads whole milliseconds)
            frame = dingtalk.push_message(CLIENT_ID, data)
            await dingtalk.wait_for(lambda: dingtalk.deliveries(frame) >= 3, WAIT, "DingTalk's redeliveries")
            assert dingtalk.acks_for(frame) == []  # not ACKed: DingTalk keeps it
            assert dify.requests_to("/chat-messages") == []
            (notice,) = await dingtalk.wait_webhook_replies(1, WAIT)
            lock.execute("ROLLBACK")  # the store works again: no restart
            card = await dingtalk.wait_card_final(out_track_id(parse_incoming(data)), WAIT)
            await dingtalk.wait_for(lambda: runtime.bridge.in_flight == 0, WAIT, "the answer to end")
            assert runtime.bridge.answered == 1
            # late, but by our own doing: not taken for the trace of a foreign consumer
            assert runtime.delivery_watch.late_deliveries == 0
        lock.close()
    assert card.final_content == echo("asked while the store is locked") and not card.failed
    assert len(dify.requests_to("/chat-messages")) == 1
    assert CANNOT_TAKE_MESSAGES in str(notice.body)
    assert len(dingtalk.webhook_replies) == 1  # told once, however often DingTalk delivered it
    store_errors = [r for r in caplog.records if r.name == "dingdifyd.store.disk" and r.levelno >= logging.ERROR]
    assert len(store_errors) == 1 and "Timeout" in store_errors[0].getMessage()  # once per outage, with a cause
    assert any("works again" in r.getMessage() for r in caplog.records)


async def test_an_answer_ended_while_the_disk_refuses_is_ended_once_it_works(tmp_path):
    store = DiskStore(tmp_path / "bot", timeout=0.05)
    ledger = AnswerLedger(store, replay_every=0.05)
    lock = sqlite3.connect(tmp_path / "bot" / "state" / "cache.db", isolation_level=None)
    try:
        assert ledger.claim("robot:m1", record("robot:m1"))
        lock.execute("BEGIN EXCLUSIVE")
        ledger.end("robot:m1")  # the disk refuses: kept, not lost (a successor would answer it again)
        assert ledger.pending == 1
        lock.execute("ROLLBACK")
        for _ in range(200):
            if ledger.pending == 0:
                break
            await asyncio.sleep(0.05)
        assert ledger.pending == 0
        assert store.unfinished_answers() == []
    finally:
        lock.close()
        await ledger.aclose()
        store.close()


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` at `directory` (a real "disk full"); skips where mounting is not allowed."""
    directory.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                            capture_output=True, timeout=10)  # fmt: skip
    if result.returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root and CAP_SYS_ADMIN)")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=10)


def test_a_full_disk_refuses_claims_and_they_work_again_once_there_is_space(tmp_path):
    with small_filesystem(tmp_path / "small") as small:
        store = DiskStore(small / "state" / "bot", timeout=0.05)
        try:
            assert store.claim_message("robot:before", record("robot:before"))
            filler = small / "filler"
            with contextlib.suppress(OSError), open(filler, "wb") as out:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            with pytest.raises(StoreUnavailable) as full:
                for index in range(200):  # until the database needs a page it cannot have
                    store.claim_message(f"robot:during-{index}", record(f"robot:during-{index}"))
            assert "full" in str(full.value)
            os.unlink(filler)  # space returns
            assert store.claim_message("robot:after", record("robot:after")) is True  # no restart needed
            assert "robot:after" in [r.message_key for r in store.unfinished_answers()]
        finally:
            store.close()


# --- Redis ------------------------------------------------------------------------------------------------------


@pytest.fixture
def redis_service(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path) as server:
        yield server


class RefusingProxy:
    """A TCP proxy to Redis on loopback, in threads of its own (the stores' calls are synchronous and would
    block a proxy on the test's event loop), that can drop every connection and refuse new ones for a while:
    a network blip for the one process that uses it, while the others reach Redis directly."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    async def refuse(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refused from now on
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # Redis itself is gone (the test's end): so is this connection
                client.close()
                continue
            with self._lock:
                self._connections |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with self._lock:
            closing = source in self._connections
            self._connections.discard(source)
        if closing:
            source.close()


async def test_an_answer_ended_during_a_redis_blip_is_ended_once_redis_answers(redis_service):
    from dingdifyd.store.redis_store import RedisStore

    proxy = RefusingProxy(redis_service.port)
    await proxy.open()
    host = RedisStore(proxy.url, "helpdesk", retry_after=0.05)
    peer = RedisStore(redis_service.url, "helpdesk")
    ledger = AnswerLedger(host, replay_every=0.05)
    try:
        assert ledger.claim("robot:m1", record("robot:m1"))
        await proxy.refuse()  # the blip
        ledger.end("robot:m1")  # refused by the store: kept, not dropped
        assert ledger.pending == 1
        assert peer._redis.hexists("dingdifyd:helpdesk:inflight", "robot:m1")
        await proxy.open()  # Redis answers again
        for _ in range(200):
            if ledger.pending == 0:
                break
            await asyncio.sleep(0.05)
        assert ledger.pending == 0
        assert not peer._redis.hexists("dingdifyd:helpdesk:inflight", "robot:m1")  # nothing for a peer to adopt
    finally:
        await ledger.aclose()
        host.close()
        peer.close()
        await proxy.refuse()


async def test_a_host_that_cannot_renew_its_lease_hands_its_card_over_before_it_lapses(
    tmp_path, dify, redis_service, caplog
):
    from dingdifyd.store.redis_store import RedisStore

    caplog.set_level(logging.INFO)
    proxy = RefusingProxy(redis_service.port)
    await proxy.open()
    async with fake_dingtalk(redeliver_after=None) as dingtalk:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        config_a = write_config(tmp_path / "a" / "c.yaml", dingtalk, dify, store=redis_service.url)
        config_b = write_config(tmp_path / "b" / "c.yaml", dingtalk, dify, store=redis_service.url)
        store_a = RedisStore(proxy.url, "helpdesk", lease_ttl=1.5, retry_after=0.05)
        store_b = RedisStore(redis_service.url, "helpdesk", lease_ttl=1.5)
        async with running_bot(config_a, store=store_a) as host_a:
            data = dingtalk.make_text_message("a slow question for host A")  # 40 words, 0.1 s apart
            dingtalk.push_message(CLIENT_ID, data)
            track = out_track_id(parse_incoming(data))
            await dingtalk.wait_for(lambda: track in dingtalk.cards and dingtalk.cards[track].timeline, WAIT, "text")
            async with running_bot(config_b, store=store_b) as host_b:
                await proxy.refuse()  # host A loses Redis: it cannot renew its lease
                card = await dingtalk.wait_card_final(track, WAIT)
                await dingtalk.wait_for(lambda: host_b.bridge.in_flight == 0, WAIT, "host B to finish")
                assert host_b.bridge.answered == 1  # B adopted the answer once A's lease lapsed
                assert host_a.bridge.answered == 0 and host_a.bridge.failed == 0  # A neither ended nor failed it
                assert host_a.bridge.handovers == 1
            await proxy.open()
            await proxy.refuse()
    finalizing = [update for update in card.timeline if update.is_finalize or update.is_error]
    assert len(finalizing) == 1 and not card.failed  # one end, B's: A stopped writing before B took over
    assert card.final_content.endswith("word39")
    assert dingtalk.webhook_replies == []  # and no second copy of the answer as a plain reply
    assert len(dify.requests_to("/chat-messages")) == 2  # A's run (stopped), B's run
    assert any("left for other processes to finish" in r.getMessage() for r in caplog.records)


async def test_alone_on_redis_a_host_that_handed_its_answer_over_finishes_it_itself(tmp_path, dify, redis_service):
    from dingdifyd.store.redis_store import RedisStore

    proxy = RefusingProxy(redis_service.port)
    await proxy.open()
    async with fake_dingtalk(redeliver_after=None) as dingtalk:
        config = write_config(tmp_path / "c.yaml", dingtalk, dify, store=redis_service.url)
        store = RedisStore(proxy.url, "helpdesk", lease_ttl=1.5, retry_after=0.05)
        async with running_bot(config, store=store) as host:
            data = dingtalk.make_text_message("a slow question, and Redis blips")
            dingtalk.push_message(CLIENT_ID, data)
            track = out_track_id(parse_incoming(data))
            await dingtalk.wait_for(lambda: track in dingtalk.cards and dingtalk.cards[track].timeline, WAIT, "text")
            await proxy.refuse()
            await dingtalk.wait_for(lambda: host.bridge.handovers == 1, WAIT, "the hand-over")
            await proxy.open()  # Redis is back: the old identity's lease lapses, and this process adopts
            card = await dingtalk.wait_card_final(track, WAIT)
            await dingtalk.wait_for(lambda: host.bridge.in_flight == 0, WAIT, "the answer to end")
        await proxy.refuse()
    assert not card.failed and card.final_content.endswith("word39")  # the whole answer, in the same card
    assert len([u for u in card.timeline if u.is_finalize or u.is_error]) == 1
    assert dingtalk.webhook_replies == []
