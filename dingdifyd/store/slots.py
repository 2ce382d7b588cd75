"""Answers in flight per Dify, counted across the processes that share it: the slot table.

Each bot is a process of its own, and with Redis several hosts serve the same bots: a bound on the answers a
Dify gets at once must be kept by all of them together. A slot is one answer in flight at one Dify (its base
URL); it has a lease the holder renews, so a process that dies (`kill -9`, a host gone) frees its slots within
the lease. Besides the slots, each process that has answers waiting says since when its oldest waits: a free
slot goes to the process waiting longest, so no process's answers starve the others'.

Three tables, one protocol:
- `SqliteSlots`: a small SQLite file in the state directory, shared by the bot processes of one host that use
  it (the bots of one config file, by default). Besides the lease, a slot of a process that no longer runs
  (its pid is gone) is freed at once.
- `RedisSlots` (dingdifyd.store.redis_store): the same in Redis, shared by every host on that Redis.
- `LocalSlots`: this process alone (no shared state; the terminal chat, and tests).

A table that fails raises StoreUnavailable; the gate (dify/gate.py) then keeps the bound within its process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from dingdifyd.errors import StoreUnavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

SLOT_LEASE = 30.0  # seconds a slot is held without renewal (the gate renews every third of it)
WAITING_TTL = 5.0  # seconds a process's "waiting since" stands without renewal (the gate polls faster)
SQLITE_TIMEOUT = 0.5  # a table locked longer than this is failing: the gate bounds answers on its own then


def owner_id() -> str:
    """This process among all that share the table: host, pid, and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class SlotTable(Protocol):
    def try_acquire(self, base: str, limit: int, since: float) -> str | None:
        """A slot at `base` (a slot id) when fewer than `limit` are held and no other process has waited
        longer than `since` (wall-clock seconds); else None, and this process is recorded as waiting since
        `since`. Raises StoreUnavailable."""
        ...

    def renew(self, base: str, slot_ids: Sequence[str], waiting_since: float | None) -> None:
        """Extend the leases of the slots held, and (not None) the record that this process waits."""
        ...

    def release(self, base: str, slot_id: str) -> None: ...
    def stop_waiting(self, base: str) -> None: ...
    def close(self) -> None: ...


class LocalSlots:
    """Slots of this process only."""

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}
        self._ids = 0

    def try_acquire(self, base: str, limit: int, since: float) -> str | None:
        held = self._held.setdefault(base, set())
        if len(held) >= limit:
            return None
        self._ids += 1
        slot = f"local-{self._ids}"
        held.add(slot)
        return slot

    def renew(self, base: str, slot_ids: Sequence[str], waiting_since: float | None) -> None:
        pass

    def release(self, base: str, slot_id: str) -> None:
        self._held.get(base, set()).discard(slot_id)

    def stop_waiting(self, base: str) -> None:
        pass

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS slots (id TEXT PRIMARY KEY, base TEXT NOT NULL, owner TEXT NOT NULL,
                                  pid INTEGER NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS slots_base ON slots (base);
CREATE TABLE IF NOT EXISTS waiting (base TEXT NOT NULL, owner TEXT NOT NULL, pid INTEGER NOT NULL,
                                    since REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (base, owner));
"""


class SqliteSlots:
    """The slot table in a SQLite file, for the processes of one host. Each call is one short transaction
    (BEGIN IMMEDIATE: the count and the insert cannot interleave with another process's)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = SLOT_LEASE,
        waiting_ttl: float = WAITING_TTL,
        timeout: float = SQLITE_TIMEOUT,
        wall: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        self.owner = owner_id()
        self.pid = os.getpid()
        self.lease = lease
        self.waiting_ttl = waiting_ttl
        self._timeout = timeout
        self._wall = wall
        self._db: sqlite3.Connection | None = None

    # --- the choke point ---------------------------------------------------------------------------------

    def _transaction(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except (sqlite3.Error, OSError) as exc:
            self._reset()
            raise StoreUnavailable(f"Dify slot table {self.path}: {what}: {type(exc).__name__}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            created = not self.path.exists()
            db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
            if created:
                with contextlib.suppress(OSError):
                    os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _reset(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    # --- the table ---------------------------------------------------------------------------------------

    def try_acquire(self, base: str, limit: int, since: float) -> str | None:
        def work(db: sqlite3.Connection) -> str | None:
            now = self._wall()
            self._drop_gone(db, now)
            (held,) = db.execute("SELECT COUNT(*) FROM slots WHERE base = ?", (base,)).fetchone()
            (oldest,) = db.execute(
                "SELECT MIN(since) FROM waiting WHERE base = ? AND owner != ?", (base, self.owner)
            ).fetchone()
            if held < limit and (oldest is None or since <= oldest):
                slot = f"{self.owner}:{secrets.token_hex(6)}"
                db.execute("INSERT INTO slots VALUES (?, ?, ?, ?, ?)", (slot, base, self.owner, self.pid,
                                                                         now + self.lease))  # fmt: skip
                return slot
            db.execute(
                "INSERT OR REPLACE INTO waiting VALUES (?, ?, ?, ?, ?)",
                (base, self.owner, self.pid, since, now + self.waiting_ttl),
            )
            return None

        return self._transaction("taking a slot", work)

    def renew(self, base: str, slot_ids: Sequence[str], waiting_since: float | None) -> None:
        def work(db: sqlite3.Connection) -> None:
            now = self._wall()
            db.executemany("UPDATE slots SET expires = ? WHERE id = ? AND owner = ?",
                           [(now + self.lease, slot, self.owner) for slot in slot_ids])  # fmt: skip
            if waiting_since is not None:
                db.execute("UPDATE waiting SET expires = ?, since = ? WHERE base = ? AND owner = ?",
                           (now + self.waiting_ttl, waiting_since, base, self.owner))  # fmt: skip

        self._transaction("renewing slots", work)

    def release(self, base: str, slot_id: str) -> None:
        self._transaction("freeing a slot", lambda db: db.execute("DELETE FROM slots WHERE id = ?", (slot_id,)))

    def stop_waiting(self, base: str) -> None:
        self._transaction(
            "leaving the queue",
            lambda db: db.execute("DELETE FROM waiting WHERE base = ? AND owner = ?", (base, self.owner)),
        )

    def close(self) -> None:
        self._reset()

    def _drop_gone(self, db: sqlite3.Connection, now: float) -> None:
        """Leases run out; and a process that is gone (killed) frees its slots at once, not after its lease."""
        db.execute("DELETE FROM slots WHERE expires < ?", (now,))
        db.execute("DELETE FROM waiting WHERE expires < ?", (now,))
        pids = {pid for (pid,) in db.execute("SELECT pid FROM slots UNION SELECT pid FROM waiting")}
        for pid in pids - {self.pid}:
            if not _process_exists(pid):
                db.execute("DELETE FROM slots WHERE pid = ?", (pid,))
                db.execute("DELETE FROM waiting WHERE pid = ?", (pid,))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process: it exists
    return True
