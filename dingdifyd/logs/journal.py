"""Log records to journald through its native protocol, with structured fields.

Why not python3-systemd's JournalHandler: the package runs in a private venv on Debian's python3, where
Debian's python3-systemd is not importable, and the PyPI build needs libsystemd's headers and a compiler. The
protocol is small and documented (systemd's "Native Journal Protocol"): one datagram per entry to
/run/systemd/journal/socket, `NAME=value\\n` per field, or `NAME\\n` + 64-bit little-endian length + value + `\\n`
for a value with a newline; an entry too large for a datagram goes in a sealed memfd passed along instead.

Each entry has MESSAGE (the same text the stream lines have), PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE/LINE/FUNC,
LOGGER, DINGDIFYD_BOT (the bot process's own name, or the bot a supervisor line is about) and whatever
logs/fields.py adds (DINGDIFYD_EVENT with its MESSAGE_ID, DINGDIFYD_MSG_ID, DINGDIFYD_CONVERSATION). When the
journal cannot be reached the line goes to the fallback stream with its `<N>` prefix, so nothing is lost.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import struct
from collections.abc import Mapping
from pathlib import Path

from dingdifyd.logs.fields import fields_of

JOURNAL_SOCKET = "/run/systemd/journal/socket"
DEFAULT_IDENTIFIER = "dingdifyd"
_FIELD_NAME = re.compile(r"^[A-Z0-9][A-Z0-9_]*$")
# sd-daemon(3) priorities
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


def encode_entry(fields: Mapping[str, str]) -> bytes:
    """One journal entry in the native protocol's serialization."""
    parts: list[bytes] = []
    for name, value in fields.items():
        if not _FIELD_NAME.match(name):
            raise ValueError(f"not a journal field name: {name!r}")
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def unit_identifier(cgroup_file: str = "/proc/self/cgroup") -> str:
    """The SYSLOG_IDENTIFIER our units give their stream lines (`dingdifyd@NAME`): the unit's name.

    journald adds a unit's SyslogIdentifier= to the lines of its stdout/stderr only; native entries name
    themselves. The units set it to the unit name without `.service`, which the process's cgroup tells.
    """
    try:
        text = Path(cgroup_file).read_text(encoding="utf-8")
    except OSError:
        return DEFAULT_IDENTIFIER
    for line in text.splitlines():
        for part in reversed(line.rsplit(":", 1)[-1].split("/")):
            if part.endswith(".service"):
                return part.removesuffix(".service")
    return DEFAULT_IDENTIFIER


class JournalSender:
    """The datagram socket to journald, opened in the process that sends (a forked child opens its own)."""

    def __init__(self, path: str = JOURNAL_SOCKET):
        self.path = path
        self._socket: socket.socket | None = None
        self._pid = 0

    def send(self, entry: bytes) -> None:
        """Raises OSError when journald cannot take it."""
        sock = self._open()
        try:
            sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_in_memfd(sock, entry)

    def _open(self) -> socket.socket:
        if self._socket is None or self._pid != os.getpid():
            # a forked child sends on a socket of its own, not on its copy of the parent's
            self.close()
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._pid = os.getpid()
        return self._socket

    def _send_in_memfd(self, sock: socket.socket, entry: bytes) -> None:
        """A large entry: written to a memfd, sealed (journald insists), and the descriptor sent instead."""
        fd = os.memfd_create("dingdifyd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, entry)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None


class JournalHandler(logging.Handler):
    """A root handler for a process whose stderr is the journal: native entries, stream lines as fallback."""

    def __init__(
        self,
        *,
        bot: str | None,
        fallback: logging.Handler,
        sender: JournalSender | None = None,
        identifier: str | None = None,
    ):
        super().__init__()
        self.bot = bot
        self.fallback = fallback
        self.sender = sender if sender is not None else JournalSender()
        self.identifier = identifier if identifier is not None else unit_identifier()

    def entry(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        if self.bot:
            fields["DINGDIFYD_BOT"] = self.bot
        fields.update(fields_of(record))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = encode_entry(self.entry(record))
        except Exception:
            self.handleError(record)
            return
        try:
            self.sender.send(entry)
        except OSError:
            self.fallback.handle(record)

    def close(self) -> None:
        self.sender.close()
        self.fallback.close()
        super().close()


def journal_available(path: str = JOURNAL_SOCKET) -> bool:
    return os.path.exists(path)
