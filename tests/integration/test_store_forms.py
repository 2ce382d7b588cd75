"""Pending human-input forms, and the Dify run of an answer in flight, in both store backends (a disk store, and a
real redis-server): one form per person and chat, kept across a restart (or on another host), forgotten after
their time; in-flight records of older versions still load."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dingdifyd.store.base import InFlight, Store
from dingdifyd.store.disk import DiskStore
from tests.integration.redis_server import RedisServer, redis_server

pytestmark = pytest.mark.timeout(30)

CHAT = "helpdesk|cid1=="


@pytest.fixture(params=["disk", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, object]]:
    if request.param == "disk":
        yield "disk", tmp_path / "state"
        return
    with redis_server(tmp_path) as server:
        yield "redis", server


def open_(backend: tuple[str, object]) -> Store:
    kind, where = backend
    if kind == "disk":
        assert isinstance(where, Path)
        return DiskStore(where)
    from dingdifyd.store.redis_store import RedisStore

    assert isinstance(where, RedisServer)
    return RedisStore(where.url, "helpdesk")


def form(title: str) -> dict[str, object]:
    return {"form": {"node_title": title}, "answer": None}


def test_one_form_per_person_and_chat_kept_across_a_restart(backend) -> None:
    store = open_(backend)
    later = time.time() + 3600
    store.save_form(CHAT, "ada", form("first"), later)
    store.save_form(CHAT, "ada", form("second"), later)  # a newer pause replaces her form
    store.save_form(CHAT, "bob", form("bob's"), later)
    store.save_form("helpdesk|cid2==", "ada", form("elsewhere"), later)
    store.close()
    reopened = open_(backend)  # a restarted process, or another host
    try:
        assert reopened.forms_in_chat(CHAT) == {"ada": form("second"), "bob": form("bob's")}
        reopened.forget_form(CHAT, "ada")
        assert reopened.forms_in_chat(CHAT) == {"bob": form("bob's")}
        assert reopened.forms_in_chat("helpdesk|cid2==") == {"ada": form("elsewhere")}
        assert reopened.forms_in_chat("helpdesk|nobody==") == {}
    finally:
        reopened.close()


def test_forms_are_forgotten_after_their_time(backend) -> None:
    store = open_(backend)
    try:
        store.save_form(CHAT, "ada", form("gone"), time.time() + 0.2)
        store.save_form(CHAT, "bob", form("kept"), time.time() + 3600)
        deadline = time.monotonic() + 5
        while "ada" in store.forms_in_chat(CHAT):
            assert time.monotonic() < deadline, "the form outlived its time"
            time.sleep(0.05)
        assert store.forms_in_chat(CHAT) == {"bob": form("kept")}
    finally:
        store.close()


def test_an_answer_in_flight_keeps_its_dify_run(backend) -> None:
    store = open_(backend)
    record = InFlight("robot:m1", {"msg_id": "m1"}, "track-m1", 1, workflow_run_id="run-1", task_id="task-1")
    store.begin_answer(record)
    store.close()
    if backend[0] == "redis":  # another process adopts it once the owner's lease is gone (closed: at once)
        survivor = open_(backend)
        assert survivor.unfinished_answers() == [record]
        survivor.close()
    else:
        reopened = open_(backend)
        assert reopened.unfinished_answers() == [record]
        reopened.close()


def test_an_in_flight_record_of_an_older_version_still_loads(backend) -> None:
    """Records written before the run id was kept have no such fields: they load with empty ones."""
    kind, where = backend
    old = {"message_key": "robot:old", "message": {"msg_id": "old"}, "out_track_id": "track-old", "attempts": 1}
    if kind == "redis":
        import redis

        assert isinstance(where, RedisServer)
        client = redis.Redis.from_url(where.url)
        client.hset("dingdifyd:helpdesk:inflight", "robot:old", json.dumps({"owner": "gone:1:x", "record": old}))
        client.close()
    else:
        store = open_(backend)
        store.begin_answer(InFlight(**old))
        store.close()
    store = open_(backend)
    try:
        (loaded,) = store.unfinished_answers()
        assert (loaded.message_key, loaded.workflow_run_id, loaded.task_id) == ("robot:old", "", "")
    finally:
        store.close()
