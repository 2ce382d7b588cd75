"""Durable state of one bot: Dify conversation ids, message de-duplication, answers in flight.

On disk with diskcache (SQLite, safe across processes), one directory per bot, opened in the bot's own process
after fork. Four kinds of record:
- conversation: session key -> Dify conversation id, with a sliding expiry (`dify_conversation_remain_time`);
- message claim: (robotCode, msgId) -> first seen; added atomically, so a redelivered message is recognised even
  after a restart;
- in flight: the message being answered, so that a process that dies mid-answer is followed by one that finishes it;
- counters: the DingTalk calls made per day and per month (dingtalk/accounting.py), kept across restarts.

`store: redis://...` keeps the same records in Redis instead, shared by the daemons of several hosts
(dingdifyd.store_redis); `open_store` picks the backend.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import diskcache

from dingdifyd.errors import ConfigError

log = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
MESSAGE_CLAIM_TTL = 7 * 24 * 3600.0  # DingTalk redelivers within minutes; a week is generous and still bounded


@dataclass(frozen=True)
class InFlight:
    """An answer that was started and not finished: enough to finish it after a crash."""

    message_key: str
    message: dict[str, Any]  # IncomingMessage fields
    out_track_id: str
    attempts: int


class Store(Protocol):
    # True when several processes, on several hosts, use the store at once (redis): each then holds a lease
    # and adopts the answers of processes that are gone (dingdifyd.adoption). False: one process at a time.
    shared: bool

    def claim_message(self, message_key: str) -> bool: ...
    def get_conversation(self, session_key: str) -> str | None: ...
    def set_conversation(self, session_key: str, conversation_id: str, ttl: float) -> None: ...
    def forget_conversation(self, session_key: str) -> None: ...
    def begin_answer(self, record: InFlight) -> None: ...
    def end_answer(self, message_key: str) -> None: ...
    def unfinished_answers(self) -> list[InFlight]: ...
    def keep_alive(self) -> None: ...
    def peers(self) -> list[str]: ...
    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int: ...
    def counter(self, key: str) -> int: ...
    def close(self) -> None: ...


class DiskStore:
    """The `store: disk` backend. Every call is a short SQLite transaction (sub-millisecond on local disk)."""

    shared = False  # one bot process per state directory: every unfinished answer is a dead process's

    def __init__(self, directory: str | os.PathLike[str]):
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError([f"state_dir: cannot create {path}: {exc.strerror}"]) from None
        # diskcache unpickles what it finds: a directory another account could have written is never opened
        check_private_directory(path)
        check_private_directory(path.parent, sticky_ok=True)
        # Separate caches so that recovery scans only the few in-flight records, never the claims.
        self._main = diskcache.Cache(str(path / "state"), timeout=10)
        self._inflight = diskcache.Cache(str(path / "inflight"), timeout=10)

    def claim_message(self, message_key: str) -> bool:
        """True the first time a message is seen, False for every redelivery. Atomic across processes."""
        return bool(self._main.add(("msg", message_key), time.time(), expire=MESSAGE_CLAIM_TTL))

    def get_conversation(self, session_key: str) -> str | None:
        value = self._main.get(("conv", session_key))
        return value if isinstance(value, str) else None

    def set_conversation(self, session_key: str, conversation_id: str, ttl: float) -> None:
        if ttl <= 0:  # `dify_conversation_remain_time: 0`: a new conversation with every message
            self._main.delete(("conv", session_key))
            return
        self._main.set(("conv", session_key), conversation_id, expire=ttl)

    def forget_conversation(self, session_key: str) -> None:
        self._main.delete(("conv", session_key))

    def begin_answer(self, record: InFlight) -> None:
        self._inflight.set(record.message_key, record)

    def end_answer(self, message_key: str) -> None:
        self._inflight.delete(message_key)

    def unfinished_answers(self) -> list[InFlight]:
        records = []
        for key in list(self._inflight.iterkeys()):
            record = self._inflight.get(key)
            if isinstance(record, InFlight):
                records.append(record)
        return records

    def incr(self, key: str, amount: int = 1, expire: float | None = None) -> int:
        """Add `amount` to a counter, atomically across processes; returns the new value. `expire`: seconds
        the counter lives from its first increment (the DingTalk call counts per day and per month)."""
        with self._main.transact():
            self._main.add(("count", key), 0, expire=expire)  # sets the expiry once; incr keeps it
            return int(self._main.incr(("count", key), amount))

    def counter(self, key: str) -> int:
        value = self._main.get(("count", key), 0)
        return value if isinstance(value, int) else 0

    def keep_alive(self) -> None:
        """Nothing to renew: no other process adopts answers from a disk store."""

    def peers(self) -> list[str]:
        return []

    def close(self) -> None:
        self._main.close()
        self._inflight.close()


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


def open_store(url: str, state_dir: str, bot_name: str) -> Store:
    if url == "disk":
        return DiskStore(Path(state_dir) / bot_name)
    if url.startswith(REDIS_SCHEMES):
        try:
            from dingdifyd.store_redis import RedisStore
        except ImportError:
            needs = "store: a redis:// store needs the redis package: pip install 'dingdifyd[redis]'"
            raise ConfigError([needs]) from None
        return RedisStore(url, bot_name)
    raise ConfigError([f"store: {url.split(':', 1)[0]}:// stores are not available; use 'disk' or redis://"])
