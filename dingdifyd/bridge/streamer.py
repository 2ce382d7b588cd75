"""Writes one growing answer into one card, paced by UpdatePolicy, and always ends it.

The reader of the Dify stream only calls `set_text`; a single writer task per card sends updates, so a card
never receives two writes at once and the newest text always wins. `close` stops the writer after its current
write and sends the final (or error) text exactly. If the card cannot be written, the final text goes out as a
plain reply instead, so the person is never left with silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from dingdifyd.bridge.coalesce import UpdatePolicy
from dingdifyd.bridge.ports import CardSink
from dingdifyd.errors import PeerError

log = logging.getLogger(__name__)


class CardStreamer:
    def __init__(
        self,
        card: CardSink,
        policy: UpdatePolicy,
        plain_reply: Callable[[str], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self._card = card
        self._policy = policy
        self._plain_reply = plain_reply
        self._clock = clock
        self._text = ""
        self._sent = ""
        self._sent_at: float | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self.card_open = False
        self.closed = False
        self.updates_sent = 0

    @property
    def text(self) -> str:
        return self._text

    async def open(self, *, already_exists_ok: bool = False) -> None:
        """Create the card. On failure the answer will be sent as a plain reply at the end."""
        try:
            await self._card.open()
            self.card_open = True
        except PeerError as exc:
            if already_exists_ok and getattr(exc, "code", None) == "param.cardAlreadyExist":
                self.card_open = True  # resuming an answer whose card an earlier process created
            else:
                log.warning("card could not be created (%s); the answer will be sent as a plain reply", _brief(exc))
        if self.card_open:
            self._writer = asyncio.create_task(self._write_loop(), name="card-writer")

    def set_text(self, text: str) -> None:
        if text != self._text:
            self._text = text
            self._wake.set()

    async def _write_loop(self) -> None:
        while not self._closing:
            delay = self._policy.delay(
                now=self._clock(),
                last_sent_at=self._sent_at,
                sent_chars=len(self._sent),
                current_chars=len(self._text),
                changed=self._text != self._sent,
            )
            if delay is None or delay > 0:
                # sleep until more text arrives, the pacing delay has passed, or close() is called
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            snapshot = self._text
            try:
                await self._card.update(snapshot)
                self.updates_sent += 1
            except PeerError as exc:
                # an intermediate update is not worth failing the answer: the final one carries everything
                log.warning("card update failed (%s); continuing", _brief(exc))
            self._sent, self._sent_at = snapshot, self._clock()

    async def _stop_writer(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer

    async def finish(self, text: str) -> None:
        await self._end(text, error=False)

    async def fail(self, text: str) -> None:
        await self._end(text, error=True)

    async def _end(self, text: str, *, error: bool) -> None:
        if self.closed:
            return
        self.closed = True
        await self._stop_writer()
        if self.card_open:
            try:
                await (self._card.fail(text) if error else self._card.finish(text))
                return
            except PeerError as exc:
                log.warning("final card update failed (%s); sending a plain reply instead", _brief(exc))
        try:
            await self._plain_reply(text)
        except PeerError as exc:
            log.error("the answer could not be delivered at all: card and plain reply failed (%s)", _brief(exc))


def _brief(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None)
    details = ", ".join(str(x) for x in (status, code) if x)
    return f"{type(exc).__name__}{f' {details}' if details else ''}: {exc}"
