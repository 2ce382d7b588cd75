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
from collections.abc import Callable

from dingdifyd.store import Store

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 30.0


async def tend_shared_store(store: Store, adopt: Callable[[], int], *, interval: float | None = None) -> None:
    """Run until cancelled. `adopt` is BridgeService.recover: it resumes what the store hands over."""
    every = interval if interval is not None else getattr(store, "lease_ttl", DEFAULT_LEASE_TTL) / 3
    known: list[str] | None = None
    while True:
        store.keep_alive()
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
