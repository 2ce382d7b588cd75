"""The `store: disk` backend: one bot's state (store/base.py) on disk.

With diskcache (SQLite, safe across processes), one directory per bot, opened in the bot's own process
after fork. Four kinds of record:
- conversation: session key -> Dify conversation id, with a sliding expiry (`dify_conversation_remain_time`);
- message claim: (robotCode, msgId) -> first seen; added atomically, so a redelivered message is recognised even
  after a restart;
- in flight: the message being answered, so that a process that dies mid-answer is followed by one that finishes it;
- counters: the DingTalk calls made per day and per month (dingtalk/accounting.py), kept across restarts;
- pending forms: per chat, per person, the human-input form a paused Dify run waits for (bridge/forms.py), as a
  plain dict, until the time it may be forgotten (a while after the form expired).

`store: redis://...` keeps the same records in Redis instead, shared by the daemons of several hosts
(store/redis_store.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import diskcache

from dingdifyd.errors import ConfigError, StoreUnavailable
from dingdifyd.store.base import MESSAGE_CLAIM_TTL, InFlight
from dingdifyd.store.slots import SqliteSlots

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLite's busy timeout: how long a call waits for a lock another process holds (it blocks the event loop
# meanwhile, so it is short; a lock held longer is an outage, see DiskStore._io)
SQLITE_TIMEOUT = 2.0
_INFLIGHT_INDEX = ("inflight-index",)
DIFY_SLOTS_FILE = "dify-slots.sqlite3"


class DiskStore:
    """The `store: disk` backend. Every call is a short SQLite transaction (sub-millisecond on local disk).

    Every call goes through `_io`, which turns SQLite and OS failures (a full or read-only disk, a database
    locked by another process for longer than `timeout`) into StoreUnavailable, logs the first of an outage
    with its cause, and the end of it. Reading a conversation degrades to "none"; claims and answers in flight
    raise, so that the bridge does not ACK what it could not claim and keeps what it could not record."""

    shared = False  # one bot process per state directory: every unfinished answer is a dead process's
    grants_claims_when_unreachable = False  # a message not claimed is not ACKed: DingTalk delivers it again

    def __init__(self, directory: str | os.PathLike[str], *, timeout: float = SQLITE_TIMEOUT):
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError([f"state_dir: cannot create {path}: {exc.strerror}"]) from None
        # diskcache unpickles what it finds: a directory another account could have written is never opened
        check_private_directory(path)
        check_private_directory(path.parent, sticky_ok=True)
        self.path = path
        self._failing_since: float | None = None
        # One cache, so that a message's claim and its answer in flight are one transaction; the answers in
        # flight are found through an index of their own, so recovery never scans the claims.
        self._main = diskcache.Cache(str(path / "state"), timeout=timeout)
        self._adopt_legacy_inflight(path / "inflight")

    # --- the choke point ---------------------------------------------------------------------------------

    def _io(self, what: str, operation: Callable[[], T]) -> T:
        try:
            result = operation()
        except (sqlite3.Error, diskcache.Timeout, OSError) as exc:
            self._rollback()
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.error(
                    "store %s failed while %s (%s); messages are not taken until it works again "
                    "(DingTalk delivers them again), nothing is lost", self.path, what, _cause(exc),
                )  # fmt: skip
            else:
                log.debug("store %s still failing (%s): %s", self.path, what, type(exc).__name__)
            raise StoreUnavailable(f"store {self.path}: {what}: {_cause(exc)}") from exc
        if self._failing_since is not None:
            log.info("store %s works again after %.0f s", self.path, time.monotonic() - self._failing_since)
            self._failing_since = None
        return result

    def _rollback(self) -> None:
        """After a failed COMMIT (a full disk) SQLite may keep the transaction open, and every later BEGIN
        would fail: end it, so that the store works again as soon as the disk does."""
        with contextlib.suppress(Exception):
            connection = self._main._con
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            self._main._txn_id = None

    # --- Store protocol ----------------------------------------------------------------------------------

    def claim_message(self, message_key: str, record: InFlight | None = None) -> bool:
        """True the first time a message is seen, False for every redelivery. Atomic across processes, and
        one transaction with its answer in flight: a crash cannot leave a claim without its record."""

        def claim() -> bool:
            with self._main.transact():
                if not self._main.add(("msg", message_key), time.time(), expire=MESSAGE_CLAIM_TTL):
                    return False
                if record is not None:
                    self._put_answer(record)
                return True

        return self._io("claiming a message", claim)

    def get_conversation(self, session_key: str) -> str | None:
        try:
            value = self._io("reading a conversation", lambda: self._main.get(("conv", session_key)))
        except StoreUnavailable:
            return None  # the person's context is not known: the answer starts a new conversation
        return value if isinstance(value, str) else None

    def set_conversation(self, session_key: str, conversation_id: str, ttl: float) -> None:
        if ttl <= 0:  # `dify_conversation_remain_time: 0`: a new conversation with every message
            self.forget_conversation(session_key)
            return
        with contextlib.suppress(StoreUnavailable):  # logged once per outage; the next turn starts afresh
            self._io("saving a conversation",
                     lambda: self._main.set(("conv", session_key), conversation_id, expire=ttl))  # fmt: skip

    def forget_conversation(self, session_key: str) -> None:
        with contextlib.suppress(StoreUnavailable):
            self._io("forgetting a conversation", lambda: self._main.delete(("conv", session_key)))

    def begin_answer(self, record: InFlight) -> None:
        def put() -> None:
            with self._main.transact():
                self._put_answer(record)

        self._io("recording an answer in flight", put)

    def end_answer(self, message_key: str) -> None:
        def end() -> None:
            with self._main.transact():
                keys = self._answer_keys()
                if message_key in keys:
                    self._main.set(_INFLIGHT_INDEX, tuple(k for k in keys if k != message_key))
                self._main.delete(("inflight", message_key))

        self._io("ending an answer in flight", end)

    def unfinished_answers(self) -> list[InFlight]:
        def read() -> list[InFlight]:
            records = []
            for key in self._answer_keys():
                record = self._main.get(("inflight", key))
                if isinstance(record, InFlight):
                    records.append(record)
            return records

        return self._io("listing answers in flight", read)

    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int:
        """Add `amount` to a counter, atomically across processes; returns the new value. `expire`: seconds
        the counter lives from its first increment (the DingTalk call counts per day and per month)."""

        def add() -> int:
            with self._main.transact():
                self._main.add(("count", key), 0, expire=expire)  # sets the expiry once; incr keeps it
                return int(self._main.incr(("count", key), amount))

        return self._io("counting", add)

    def counter(self, key: str) -> int:
        value = self._io("reading a counter", lambda: self._main.get(("count", key), 0))
        return value if isinstance(value, int) else 0

    def save_form(self, chat_key: str, person: str, record: dict[str, Any], forget_at: float) -> None:
        """Keep `person`'s pending form in the chat (one per person: it replaces theirs) until `forget_at` (unix)."""
        key = ("forms", chat_key)
        with self._main.transact():
            forms = _live_forms(self._main.get(key), time.time())
            forms[person] = (forget_at, record)
            self._main.set(key, forms, expire=max(f for f, _ in forms.values()) - time.time())

    def forms_in_chat(self, chat_key: str) -> dict[str, dict[str, Any]]:
        """The pending forms of a chat, by person; forgotten ones left out."""
        return {person: record for person, (_, record) in _live_forms(self._main.get(("forms", chat_key)),
                                                                        time.time()).items()}  # fmt: skip

    def forget_form(self, chat_key: str, person: str) -> None:
        key = ("forms", chat_key)
        with self._main.transact():
            forms = _live_forms(self._main.get(key), time.time())
            forms.pop(person, None)
            if forms:
                self._main.set(key, forms, expire=max(f for f, _ in forms.values()) - time.time())
            else:
                self._main.delete(key)

    def keep_alive(self) -> bool:
        """Nothing to renew: no other process adopts answers from a disk store."""
        return True

    def dify_slots(self) -> SqliteSlots:
        """A slot table next to the bots' state directories: the bots of one host whose state_dir is the same
        (those of one config file, by default) share their Difys' bounds."""
        return SqliteSlots(self.path.parent / DIFY_SLOTS_FILE)

    def peers(self) -> list[str]:
        return []

    def close(self) -> None:
        self._main.close()

    # --- helpers (inside a transaction) --------------------------------------------------------------------

    def _answer_keys(self) -> tuple[str, ...]:
        keys = self._main.get(_INFLIGHT_INDEX, ())
        return tuple(keys) if isinstance(keys, tuple | list) else ()

    def _put_answer(self, record: InFlight) -> None:
        keys = self._answer_keys()
        if record.message_key not in keys:
            self._main.set(_INFLIGHT_INDEX, (*keys, record.message_key))
        self._main.set(("inflight", record.message_key), record)

    def _adopt_legacy_inflight(self, directory: Path) -> None:
        """Answers in flight recorded by an earlier version, in a cache of their own: moved into the main one."""
        if not directory.is_dir():
            return
        check_private_directory(directory)
        legacy = diskcache.Cache(str(directory), timeout=SQLITE_TIMEOUT)
        try:
            for key in list(legacy.iterkeys()):
                record = legacy.get(key)
                if isinstance(record, InFlight):
                    self.begin_answer(record)
                legacy.delete(key)
        finally:
            legacy.close()
        shutil.rmtree(directory, ignore_errors=True)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, diskcache.Timeout):
        return "Timeout: the database is locked by another process"
    return f"{type(exc).__name__}: {exc}"


def check_private_directory(path: Path, *, sticky_ok: bool = False) -> None:
    """Refuse a state directory this account does not own, or that other accounts may write to (their files
    would be unpickled, or could replace ours). `sticky_ok`: a shared parent like /tmp, whose sticky bit stops
    others from renaming what is ours, is fine."""
    try:
        status = os.stat(path)
    except OSError as exc:
        raise ConfigError([f"state_dir: cannot read {path}: {exc.strerror}"]) from None
    if not stat.S_ISDIR(status.st_mode):
        raise ConfigError([f"state_dir: {path} is not a directory"])
    euid = os.geteuid()
    if status.st_uid not in (euid, 0):
        raise ConfigError([
            f"state_dir: {path} is owned by uid {status.st_uid}, not by this account (uid {euid}); "
            "use a directory of its own (the packaged unit's StateDirectory= is)"
        ])  # fmt: skip
    writable_by_group = status.st_mode & stat.S_IWGRP and status.st_gid != os.getegid()
    if (status.st_mode & stat.S_IWOTH or writable_by_group) and not (sticky_ok and status.st_mode & stat.S_ISVTX):
        raise ConfigError([
            f"state_dir: {path} is writable by other users (mode {stat.S_IMODE(status.st_mode):04o}); "
            f"chmod 700 {path}, or set state_dir to a directory of this account"
        ])  # fmt: skip


def _live_forms(value: Any, now: float) -> dict[str, tuple[float, dict[str, Any]]]:
    """A chat's stored forms (person -> (forget at, record)) without those past their time."""
    if not isinstance(value, dict):
        return {}
    return {
        person: (forget_at, record)
        for person, (forget_at, record) in value.items()
        if isinstance(record, dict) and forget_at > now
    }
