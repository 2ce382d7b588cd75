"""The child side of the supervisor protocol: a bot process's channel upward, and its heartbeat.

Messages are small tuples on a one-way `multiprocessing` pipe: `("connected",)`, `("heartbeat", in_flight)`
or `("heartbeat", in_flight, stats)` (a dict: counters such as `dingtalk_calls_month`, the live `status` and
the `metrics` snapshot; see worker/stats.py), `("disconnected",)`, `("problem", text)` (why it is not connected).
Any message proves the child's event loop runs; the supervisor replaces a child silent for `heartbeat_timeout`,
so heartbeats must come from a coroutine on the bot's loop (`heartbeat_loop`), never from a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import struct
import termios
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

log = logging.getLogger(__name__)

PROBLEM_MAX = 200  # characters of a "problem" message: a reason, not a log


def heartbeat_interval(heartbeat_timeout: float) -> float:
    """A heartbeat period that lets several beats go missing before the supervisor gives up on the child."""
    return max(0.05, min(2.0, heartbeat_timeout / 4))


class ParentChannel:
    """Messages to the supervisor. Never blocks the event loop, never raises when the supervisor is gone."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._alive = True
        # A full pipe (a supervisor that stopped reading) must drop a heartbeat, not block the loop.
        # Each message is far below PIPE_BUF, so a non-blocking write is all or nothing.
        with contextlib.suppress(OSError, ValueError):
            os.set_blocking(conn.fileno(), False)

    @property
    def parent_alive(self) -> bool:
        """False once the supervisor's end is gone (the child should then stop: nobody supervises it)."""
        return self._alive

    def connected(self) -> None:
        self._send(("connected",))

    def heartbeat(self, in_flight: int, stats: dict[str, Any] | None = None) -> None:
        if stats:
            self._send(("heartbeat", int(in_flight), dict(stats)))
        else:
            self._send(("heartbeat", int(in_flight)))

    def disconnected(self) -> None:
        self._send(("disconnected",))

    def problem(self, text: str) -> None:
        """Why the bot is not connected (yet): shown in systemd's STATUS until it connects."""
        self._send(("problem", text[:PROBLEM_MAX]))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()

    def _send(self, message: tuple[object, ...]) -> None:
        if not self._alive:
            return
        try:
            payload = bytes(ForkingPickler.dumps(message))
            if len(payload) + 4 > select.PIPE_BUF and not self._room_for(len(payload) + 4):
                # a write larger than PIPE_BUF is not atomic: half of it in a nearly full pipe would tear the
                # stream for good; a message skipped is only one heartbeat late
                log.debug("supervisor pipe nearly full; %s dropped", message[0])
                return
            self._conn.send_bytes(payload)  # what send() does, with the size known beforehand
        except BlockingIOError:
            log.debug("supervisor pipe full; %s dropped", message[0])
        except (OSError, ValueError, EOFError):
            # EPIPE: the supervisor died; ValueError/OSError: our end was closed
            self._alive = False
            log.debug("supervisor gone; no more messages to it")


    def _room_for(self, size: int) -> bool:
        """Whether the pipe has room for `size` more bytes right now (True when that cannot be known)."""
        try:
            fd = self._conn.fileno()
            capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
            queued: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return True
        return capacity - queued >= size


REPORT_GAP = 0.25  # seconds between two reports at the least, however often something worth reporting happens


async def heartbeat_loop(
    channel: ParentChannel,
    interval: float,
    in_flight: Callable[[], int],
    stats: Callable[[], dict[str, Any]] | None = None,
    soon: asyncio.Event | None = None,
) -> None:
    """Send `("heartbeat", in_flight()[, stats()])` every `interval` seconds, and sooner (but at most every
    REPORT_GAP) when `soon` is set: an answer that just ended shows in `dingdifyd status` at once, not a beat
    later. Returns once the supervisor is gone."""
    while channel.parent_alive:
        channel.heartbeat(in_flight(), stats() if stats is not None else None)
        if soon is None:
            await asyncio.sleep(interval)
            continue
        soon.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(soon.wait(), interval)
            await asyncio.sleep(REPORT_GAP)
