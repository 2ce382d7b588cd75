"""Noticing what DingTalk does not say: that another connection of the same app takes messages first.

DingTalk hands each message of an app to ONE of the app's live Stream connections, chosen at random, and
nothing in the protocol tells a client about the others. So a second program using the same client id (an
old dify-on-dingtalk still running, a test instance, a stale process on another host) silently takes a share
of the messages. What can be seen from here:

- A message that arrives late although this connection was up when it was written. DingTalk delivers within
  a second; it delivers again, to a random connection, when a message is not acknowledged (after about 60 s).
  A message written while we were connected and reaching us much later went somewhere else first: to a
  connection that did not acknowledge it (a stale or broken consumer), or DingTalk was slow, or this host's
  clock is off. That is logged as a warning (at most once per `warn_every`, with a count).
- With a shared store, the other dingdifyd processes of the bot (dingdifyd.worker.adoption logs them).

What cannot be seen: another program that acknowledges the messages it takes. Its share never reaches us,
and DingTalk gives no sign of it. Hence the note at start: one consumer per app, or several dingdifyd that
share one redis store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)

# seconds: well above DingTalk's normal latency and NTP'd clock skew, below its ~60 s redelivery
LATE_AFTER = 20.0
WARN_EVERY = 600.0


class DeliveryWatch:
    def __init__(
        self,
        client_id: str,
        *,
        late_after: float = LATE_AFTER,
        warn_every: float = WARN_EVERY,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.client_id = client_id
        self.late_after = late_after
        self.warn_every = warn_every
        self._now = wall_clock
        self._connected_since: float | None = None  # wall-clock seconds
        self._last_warning: float | None = None
        self._suppressed = 0
        self.late_deliveries = 0

    def started(self, *, shared_store: bool) -> None:
        if shared_store:
            log.info(
                "DingTalk hands each message of app %s to one of its connections at random; every process "
                "serving it must be a dingdifyd on this same store", self.client_id,
            )  # fmt: skip
        else:
            log.info(
                "DingTalk hands each message of app %s to one of its connections at random: run only this "
                "process with this client id (or several dingdifyd sharing one redis store), or messages "
                "will go to the other program", self.client_id,
            )  # fmt: skip

    def connected(self) -> None:
        self._connected_since = self._now()

    def disconnected(self) -> None:
        self._connected_since = None

    def observe(self, message: IncomingMessage) -> bool:
        """Look at one delivered message; True (and maybe a warning) when it arrived suspiciously late."""
        if not message.created_at_ms or self._connected_since is None:
            return False
        now = self._now()
        created = message.created_at_ms / 1000.0
        if created < self._connected_since:
            return False  # written while we were away: DingTalk kept it for us, as it should
        lateness = now - created
        if lateness < self.late_after:
            return False
        self.late_deliveries += 1
        if self._last_warning is not None and now - self._last_warning < self.warn_every:
            self._suppressed += 1
            return True
        more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
        log.warning(
            "message %s reached app %s %.0f s after it was written although this connection was up: DingTalk "
            "probably gave it first to another connection of the same app that did not acknowledge it (a "
            "second program or a stale process using this client id?), or this host's clock is off%s",
            message.msg_id, self.client_id, lateness, more,
        )  # fmt: skip
        self._last_warning = now
        self._suppressed = 0
        return True
