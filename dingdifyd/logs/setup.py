"""Logging for the supervisor and each bot process: one stderr handler, journald-aware, secrets redacted.

Under systemd (`$JOURNAL_STREAM` names our stderr) every line gets an sd-daemon `<N>` priority prefix and
no timestamp, since journald stamps and prioritises each line itself; elsewhere lines carry a timestamp and
level.
Every line names its process: `[helpdesk]` in a bot's process, `[supervisor]` in the supervisor.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import TextIO

from dingdifyd.config import Secret
from dingdifyd.logs.journal import JOURNAL_SOCKET, JournalHandler, JournalSender, journal_available, syslog_priority

SUPERVISOR_TAG = "supervisor"
REDACTED = "****"

# Third-party loggers that talk too much at INFO. The DingTalk SDK also logs its connection ticket at INFO.
NOISY_LOGGERS = {
    "dingtalk_stream": logging.WARNING,
    "websockets": logging.WARNING,
    "urllib3": logging.WARNING,
    "aiohttp.access": logging.WARNING,
}

# Credentials that can show up inside text we log (URLs, headers, response bodies an SDK logs).
_TOKEN_PATTERNS = (
    re.compile(r"(access_?token=)[^&\s\"',;]+", re.IGNORECASE),
    re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE),
    re.compile(r"((?:access_?token|ticket)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]+", re.IGNORECASE),
    re.compile(r"(x-acs-dingtalk-access-token[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]+", re.IGNORECASE),
)

_MIN_SECRET_LENGTH = 4  # shorter "secrets" would mangle every line they happen to occur in
_secrets: set[str] = set()
_secrets_pattern: re.Pattern[str] | None = None


def register_secret(value: str | Secret | None) -> None:
    """From now on, `value` is replaced by `****` wherever it appears in a log line of this process."""
    global _secrets_pattern
    if isinstance(value, Secret) and value.is_sealed:
        return  # not this process's to know
    text = value.reveal() if isinstance(value, Secret) else value
    if not text or len(text) < _MIN_SECRET_LENGTH or text in _secrets:
        return
    _secrets.add(text)
    # longest first, so a secret containing another is replaced whole
    alternatives = sorted(_secrets, key=len, reverse=True)
    _secrets_pattern = re.compile("|".join(re.escape(s) for s in alternatives))


def redact(text: str) -> str:
    if _secrets_pattern is not None:
        text = _secrets_pattern.sub(REDACTED, text)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(r"\g<1>" + REDACTED, text)
    return text


class DingdifydFormatter(logging.Formatter):
    """Names the process in every line, redacts secrets, and prefixes each line with `<N>` for journald."""

    def __init__(self, tag: str, *, journal: bool, prefix: bool = True):
        """`journal`: no timestamp, journald stamps each entry; `prefix`: `<N>` on each line (a stream to the
        journal; a native entry carries its PRIORITY field instead)."""
        escaped = tag.replace("%", "%%")
        if journal:
            fmt = f"[{escaped}] %(name)s: %(message)s"
        else:
            fmt = f"%(asctime)s %(levelname)s [{escaped}] %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal
        self.prefix = journal and prefix

    def format(self, record: logging.LogRecord) -> str:
        try:
            text = super().format(record)
        except (TypeError, ValueError):
            # a third-party call with mismatched %-args must not cost us the line (nor raise into the caller)
            record.msg = f"{record.msg} {record.args!r}"
            record.args = None
            text = super().format(record)
        text = redact(text)
        if not self.prefix:
            return text
        # every line of a traceback needs the prefix, or journald files it at the default priority
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class _NoisyLoggerFilter(logging.Filter):
    """Enforces NOISY_LOGGERS at the handler: the DingTalk SDK sets its loggers to INFO on creating them."""

    def __init__(self, floors: Mapping[str, int]):
        super().__init__()
        self.floors = dict(floors)

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        for prefix, floor in self.floors.items():
            if name == prefix or name.startswith(prefix + "."):
                return record.levelno >= floor
        return True


def connected_to_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `$JOURNAL_STREAM` (`<device>:<inode>`) is the file `stream` writes to.

    Checking the inode, not just the variable's presence, keeps journal formatting out of a terminal whose
    shell happened to inherit JOURNAL_STREAM from a service.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        device, inode = (int(part) for part in value.split(":", 1))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError, io.UnsupportedOperation):
        return False
    return status.st_dev == device and status.st_ino == inode


def setup_logging(
    level: str = "INFO",
    bot: str | None = None,
    *,
    stream: TextIO | None = None,
    journal: bool | None = None,
    environ: Mapping[str, str] | None = None,
    journal_socket: str | None = JOURNAL_SOCKET,
) -> logging.Handler:
    """Install the one root handler for this process, replacing any earlier one. Safe to call again.

    `bot` names the bot process (None: the supervisor). `journal` None detects it from `$JOURNAL_STREAM`.
    Under the journal, entries go to `journal_socket` with structured fields (logs/journal.py) when it exists, and
    to the stream with `<N>` prefixes otherwise (or when it is None).
    """
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = connected_to_journal(stream, environ)
    # an unknown name is INFO (config validation names the levels; this never fails a process over its log)
    levelno = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    # at DEBUG the SDK's INFO lines (connection endpoint, reconnects) are worth seeing too
    floors = {
        name: min(floor, logging.INFO) if levelno <= logging.DEBUG else floor
        for name, floor in NOISY_LOGGERS.items()
    }

    tag = bot or SUPERVISOR_TAG
    handler: logging.Handler = logging.StreamHandler(stream)
    handler.setFormatter(DingdifydFormatter(tag, journal=journal))
    if journal and journal_socket is not None and journal_available(journal_socket):
        native = JournalHandler(bot=bot, fallback=handler, sender=JournalSender(journal_socket))
        native.setFormatter(DingdifydFormatter(tag, journal=True, prefix=False))
        handler = native
    handler.addFilter(_NoisyLoggerFilter(floors))

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, JournalHandler):
            old.close()  # its socket (in a forked child: the child's copy of the supervisor's)
    root.addHandler(handler)
    root.setLevel(levelno)

    for name, floor in floors.items():
        logging.getLogger(name).setLevel(floor)
    # The SDK's setup_default_logger adds its own StreamHandler when no handler is visible yet; drop any it
    # added before we ran, so its lines go through ours, once. Later ones see our root handler and add none.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".")[0] == "dingtalk_stream":
            for old in list(logger.handlers):
                logger.removeHandler(old)
            logger.propagate = True
    return handler
