"""Answers in flight on a store shared by several processes (redis): leases and adoption.

Each process serving a bot through a shared store renews a lease every third of its lifetime and, right
after, adopts the answers in flight of processes whose lease has expired (they crashed, or their host went
away): the store hands each such answer to exactly one process, and the bridge finishes it in the same card.
An answer whose process is alive is never touched, however long it takes. It also logs which other processes
serve the bot, whenever that changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from dingdifyd.store.base import Store

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 30.0
RENEW_RETRY = 1.0  # seconds between two tries of a lease renewal that failed


async def tend_shared_store(
    store: Store,
    adopt: Callable[[], int],
    *,
    interval: float | None = None,
    hand_over: Callable[[], int] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run until cancelled. `adopt` is BridgeService.recover: it resumes what the store hands over.

    A renewal that fails is tried again every RENEW_RETRY seconds. When the lease is about to lapse without
    one (a third of its life left), this process can no longer prove to the others that it is alive: they
    will adopt its answers, so `hand_over` (BridgeService.hand_over) stops writing them first, and the store
    takes a new identity; the old one's answers become adoptable, by this process too, once its lease lapses.
    """
    lease_ttl = float(getattr(store, "lease_ttl", DEFAULT_LEASE_TTL))
    every = interval if interval is not None else lease_ttl / 3
    known: list[str] | None = None
    while True:
        if not store.keep_alive():
            expires = getattr(store, "lease_expires_at", lambda: None)()
            if expires is not None and clock() >= expires - lease_ttl / 3:
                handed = hand_over() if hand_over is not None else 0
                old = store.take_new_identity() if hasattr(store, "take_new_identity") else "?"
                log.error(
                    "the shared store could not renew this process's lease in time; %d answers in flight were "
                    "left for other processes to finish (%s is given up)", handed, _host_pid(old),
                )  # fmt: skip
            await asyncio.sleep(min(every, RENEW_RETRY))
            continue
        peers = store.peers()
        if peers != known:
            if peers:
                others = ", ".join(_host_pid(p) for p in peers)
                log.info("also serving this bot through the shared store: %s", others)
            elif known:
                log.info("no other process serves this bot through the shared store any more")
            known = peers
        try:
            adopted = adopt()
        except Exception:
            # one bad record must not end the tending: the lease would lapse, others would adopt our answers
            log.exception("adopting answers in flight failed")
            adopted = 0
        if adopted:
            log.warning("adopted %d answers in flight from processes that are gone", adopted)
        await asyncio.sleep(every)


def _host_pid(consumer: str) -> str:
    """`host:pid:token` -> `host (pid N)`."""
    parts = consumer.rsplit(":", 2)
    return f"{parts[0]} (pid {parts[1]})" if len(parts) == 3 else consumer
