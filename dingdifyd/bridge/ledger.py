"""The answers in flight as the store keeps them, written so that none is lost or repeated.

A message is claimed together with its answer in flight (one transaction); the record is updated once the
card shows the final answer (so that a successor never asks Dify again) and after each file sent after the
card, and removed when the answer is done. A write the store cannot make now (a full disk, Redis out of
reach) is kept in memory and replayed, in order, until it is made: the latest state of each answer wins.
Claims are the store's policy: a disk store that cannot write refuses (the message is not ACKed, DingTalk
delivers it again); a Redis store out of reach grants, and its record is replayed like any other write.
"""

from __future__ import annotations

import asyncio
import logging

from dingdifyd.errors import StoreUnavailable
from dingdifyd.store.base import InFlight, Store

log = logging.getLogger(__name__)

REPLAY_EVERY = 1.0  # seconds between two attempts to make the writes the store refused


class AnswerLedger:
    def __init__(self, store: Store, *, replay_every: float = REPLAY_EVERY):
        self.store = store
        self.replay_every = replay_every
        self._pending: dict[str, InFlight | None] = {}  # message key -> record to write, or None: to end
        self._stored: set[str] = set()  # answers whose record the store has (another process could adopt)
        self._replaying: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Writes waiting for the store."""
        return len(self._pending)

    def in_store(self, message_key: str) -> bool:
        """Whether the store holds this answer's record (written at least once, not yet ended)."""
        return message_key in self._stored

    def claim(self, message_key: str, record: InFlight | None) -> bool:
        """Claim a message (with its answer in flight); False for a redelivery. Raises StoreUnavailable when
        the store cannot tell and its policy is to refuse."""
        try:
            claimed = self.store.claim_message(message_key, record)
        except StoreUnavailable:
            if not self.store.grants_claims_when_unreachable:
                raise
            if record is not None:
                self._keep(record.message_key, record)
            return True
        if claimed and record is not None:
            self._stored.add(record.message_key)
        return claimed

    def save(self, record: InFlight) -> None:
        """Keep the answer's new state (attempts, final delivered, what is left to send)."""
        self._write(record.message_key, record)

    def end(self, message_key: str) -> None:
        self._write(message_key, None)

    def forget(self, message_key: str) -> None:
        """Write nothing more about this answer: another process takes it over."""
        self._pending.pop(message_key, None)
        self._stored.discard(message_key)

    def replay(self) -> bool:
        """Make the kept writes, oldest first; True once none is left."""
        for key, record in list(self._pending.items()):
            try:
                self._apply(key, record)
            except StoreUnavailable:
                return False
            if self._pending.get(key) is record:
                del self._pending[key]
        return True

    # --- internals ---------------------------------------------------------------------------------------

    def _write(self, key: str, record: InFlight | None) -> None:
        if key in self._pending:
            self._keep(key, record)  # an earlier write of it still waits: this one takes its place, in order
            return
        try:
            self._apply(key, record)
        except StoreUnavailable:
            self._keep(key, record)

    def _apply(self, key: str, record: InFlight | None) -> None:
        if record is None:
            self.store.end_answer(key)
            self._stored.discard(key)
        else:
            self.store.begin_answer(record)
            self._stored.add(key)

    def _keep(self, key: str, record: InFlight | None) -> None:
        self._pending[key] = record
        if self._replaying is None or self._replaying.done():
            self._replaying = asyncio.get_running_loop().create_task(self._replay_until_done(), name="ledger")

    async def _replay_until_done(self) -> None:
        log.warning("the store refused a write about an answer in flight; keeping it, and trying again")
        while self._pending:
            await asyncio.sleep(self.replay_every)
            if self.replay():
                log.info("the store took the writes about answers in flight it had refused")

    async def aclose(self) -> None:
        """At a stop: one last try, then what could not be written is said."""
        if self._replaying is not None:
            self._replaying.cancel()
        if not self.replay():
            log.error("%d writes about answers in flight could not be made; a successor may answer them again",
                      len(self._pending))  # fmt: skip
