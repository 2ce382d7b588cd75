"""sd_notify for the supervisor: READY / STATUS / WATCHDOG / RELOADING / STOPPING datagrams to systemd.

A thin wrapper over the `sdnotify` package. It opens a socket per message instead of keeping one: nothing
stays open for the bot processes to inherit at fork, and a message costs microseconds. Without `NOTIFY_SOCKET`
(not run by systemd, or a test) every call is a no-op. Failures are logged at DEBUG and never raised: losing a
status line must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    @property
    def enabled(self) -> bool:
        # read per message, as sdnotify reads it: a child that dropped the variable can never notify
        return bool(os.environ.get("NOTIFY_SOCKET"))

    def send(self, *fields: str) -> bool:
        """Send `fields` (`KEY=value` each) in one datagram. True when it was sent (systemd may still drop it)."""
        if not self.enabled or not fields:
            return False
        try:
            with warnings.catch_warnings():
                # when connect() fails, sdnotify drops its socket unclosed: the ResourceWarning is its, not ours
                warnings.simplefilter("ignore", ResourceWarning)
                notifier = sdnotify.SystemdNotifier(debug=True)
        except (OSError, TypeError) as exc:
            log.debug("sd_notify: cannot reach the notify socket: %s", exc)
            return False
        try:
            notifier.notify("\n".join(fields))
        except OSError as exc:
            log.debug("sd_notify: sending %s failed: %s", fields[0].split("=", 1)[0], exc)
            return False
        finally:
            notifier.socket.close()
        return True

    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        # STATUS is one line; a newline would start a new field
        self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp `Type=notify-reload` (systemd >= 253) requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, extend_timeout: float | None = None) -> None:
        """STOPPING=1; with `extend_timeout`, ask systemd for at least that many seconds to finish."""
        fields = ["STOPPING=1"]
        if extend_timeout is not None and extend_timeout > 0:
            fields.append(f"EXTEND_TIMEOUT_USEC={int(extend_timeout * 1_000_000)}")
        self.send(*fields)


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings (half of `WATCHDOG_USEC`); None when no watchdog is armed."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2
