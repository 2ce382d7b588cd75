"""Signal handling for the supervisor: handlers only record the signal; the main loop acts on it.

A handler that logs, reaps or spawns can deadlock (the logging lock may be held by the code it interrupted:
gunicorn #3198/#3004). So the handler appends to a deque, and `signal.set_wakeup_fd` writes a byte to a
non-blocking pipe whose read end sits in the main loop's `wait()`, so a signal ends the wait at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

SUPERVISOR_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_installed: SignalQueue | None = None

# what signal.signal() returns: the handler it replaced (None: one not installed from Python)
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SignalQueue:
    def __init__(self, signums: Iterable[int] = SUPERVISOR_SIGNALS):
        self.signums = tuple(signums)
        self._pending: deque[int] = deque()
        self._read_fd = -1
        self._write_fd = -1
        self._previous_handlers: dict[int, _Handler] = {}
        self._previous_wakeup_fd = -1

    def install(self) -> None:
        """Must run in the main thread, before any child is forked."""
        global _installed
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.signums:
            self._previous_handlers[signum] = signal.signal(signum, self._record)
        _installed = self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)  # deque.append is atomic: safe however the handler interleaves

    def fileno(self) -> int:
        """The pipe end to wait on: readable once a signal arrived."""
        return self._read_fd

    def drain(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        with contextlib.suppress(OSError):
            while os.read(self._read_fd, 512):
                pass
        received = []
        while self._pending:
            received.append(self._pending.popleft())
        return received

    def uninstall(self) -> None:
        """Put back the handlers and wakeup fd found at `install()`; close the pipe."""
        global _installed
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._close_pipe()
        if _installed is self:
            _installed = None

    def _close_pipe(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = -1
        self._pending.clear()


def reset_in_child() -> None:
    """First thing in a forked child: default handlers, no wakeup fd, the parent's signal pipe closed.

    The C-level wakeup fd survives fork; without this a child's signals would be written into the parent's
    pipe and wake the supervisor for nothing (or be read as the supervisor's own).
    """
    global _installed
    signal.set_wakeup_fd(-1)
    recorded = _installed.signums if _installed is not None else ()
    for signum in {signal.SIGTERM, signal.SIGHUP, *recorded} - {signal.SIGINT}:
        signal.signal(signum, signal.SIG_DFL)
    # Python's own default for SIGINT (KeyboardInterrupt), not SIG_DFL: what a fresh interpreter has
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _installed is not None:
        _installed._previous_handlers.clear()
        _installed._close_pipe()
        _installed = None
