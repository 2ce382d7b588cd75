"""The journal's native protocol, received by a datagram socket standing in for journald."""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dingdifyd.config import Secret
from dingdifyd.logs.fields import EVENTS, conversation_hash, event, message_context
from dingdifyd.logs.journal import encode_entry, unit_identifier
from dingdifyd.logs.setup import register_secret, setup_logging
from tests.unit.test_logsetup import journal_env, restore_logging  # noqa: F401  (a fixture used below)


@pytest.fixture(autouse=True)
def close_journal_handlers(restore_logging: None) -> Iterator[None]:  # noqa: F811
    """Before the root logger gets pytest's handlers back: close ours (their sockets)."""
    yield
    for handler in logging.getLogger().handlers:
        handler.close()


def parse_entry(data: bytes) -> dict[str, str]:
    """journald's reading of one native entry."""
    fields: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            data = rest
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8 : 8 + size].decode()
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
    return fields


class FakeJournald:
    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.settimeout(5)

    def entry(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:  # a large entry, passed as a sealed memfd
            with os.fdopen(fds[0], "rb") as file:
                data = os.pread(file.fileno(), 1 << 22, 0)  # journald maps it: the offset is the sender's
        return parse_entry(data)


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[FakeJournald]:
    fake = FakeJournald(tmp_path / "journal.socket")
    yield fake
    fake.sock.close()


@pytest.fixture
def stream(tmp_path: Path) -> Iterator:
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as file:
        yield file


def test_an_event_line_is_an_entry_with_its_fields(journald, stream):
    setup_logging("INFO", bot="hr", stream=stream, environ=journal_env(stream), journal_socket=journald.path)
    logging.getLogger("dingdifyd.bridge.service").info(
        "message %s answered", "msg-1", extra=event("answered", msg_id="msg-1", conversation_id="cidSECRETCHAT==")
    )
    entry = journald.entry()
    assert entry["MESSAGE"] == "[hr] dingdifyd.bridge.service: message msg-1 answered"
    assert entry["PRIORITY"] == "6"
    assert entry["DINGDIFYD_BOT"] == "hr"
    assert entry["DINGDIFYD_EVENT"] == "answered"
    assert entry["MESSAGE_ID"] == EVENTS["answered"]
    assert entry["DINGDIFYD_MSG_ID"] == "msg-1"
    assert entry["DINGDIFYD_CONVERSATION"] == conversation_hash("cidSECRETCHAT==")
    assert "SECRETCHAT" not in entry["DINGDIFYD_CONVERSATION"] and len(entry["DINGDIFYD_CONVERSATION"]) == 12
    assert entry["LOGGER"] == "dingdifyd.bridge.service" and entry["CODE_FUNC"]
    assert entry["SYSLOG_IDENTIFIER"]
    stream.seek(0)
    assert stream.read() == "", "an entry the journal took is not written to stderr too"


def test_every_line_of_a_message_task_carries_its_id(journald, stream):
    setup_logging("INFO", bot="hr", stream=stream, environ=journal_env(stream), journal_socket=journald.path)
    log = logging.getLogger("dingdifyd.dingtalk.api")

    async def handle() -> None:
        await asyncio.create_task(asyncio.sleep(0))
        await asyncio.create_task(_warn(log))  # a task started inside inherits the context

    async def answer() -> None:
        await asyncio.create_task(handle(), context=message_context("msg-2", "cidGROUP=="))
        log.warning("after the message")

    asyncio.run(answer())
    inside, after = journald.entry(), journald.entry()
    assert inside["DINGDIFYD_MSG_ID"] == "msg-2" and inside["PRIORITY"] == "4"
    assert inside["DINGDIFYD_CONVERSATION"] == conversation_hash("cidGROUP==")
    assert "DINGDIFYD_MSG_ID" not in after and after["DINGDIFYD_BOT"] == "hr"


async def _warn(log: logging.Logger) -> None:
    log.warning("card call failed")


def test_a_supervisor_line_names_the_bot_it_is_about(journald, stream):
    setup_logging("INFO", stream=stream, environ=journal_env(stream), journal_socket=journald.path)
    logging.getLogger("dingdifyd.supervisor.arbiter").warning("hr: pid 7 exited with code 1", extra=event(
        "exited", bot="hr"))  # fmt: skip
    entry = journald.entry()
    assert entry["MESSAGE"].startswith("[supervisor] ")
    assert (entry["DINGDIFYD_BOT"], entry["DINGDIFYD_EVENT"], entry["PRIORITY"]) == ("hr", "exited", "4")


def test_a_traceback_is_one_entry_and_secrets_are_redacted(journald, stream):
    register_secret(Secret("journal-secret-value-123"))
    setup_logging("INFO", bot="hr", stream=stream, environ=journal_env(stream), journal_socket=journald.path)
    try:
        raise RuntimeError("token journal-secret-value-123 leaked")
    except RuntimeError:
        logging.getLogger("dingdifyd.worker").exception("it failed")
    entry = journald.entry()
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("[hr] dingdifyd.worker: it failed\nTraceback")
    assert "journal-secret-value-123" not in entry["MESSAGE"] and "****" in entry["MESSAGE"]


def test_an_entry_too_large_for_a_datagram_goes_in_a_memfd(journald, stream):
    setup_logging("INFO", bot="hr", stream=stream, environ=journal_env(stream), journal_socket=journald.path)
    big = "x" * 400_000  # above the datagram limit (wmem_max)
    logging.getLogger("dingdifyd.worker").info("big %s", big)
    assert journald.entry()["MESSAGE"].endswith(big)


def test_without_journald_the_line_goes_to_stderr_with_its_priority(tmp_path, stream):
    gone = FakeJournald(tmp_path / "gone.socket")
    gone.sock.close()  # the path exists, nobody listens: journald stopped
    setup_logging("INFO", bot="hr", stream=stream, environ=journal_env(stream), journal_socket=gone.path)
    logging.getLogger("dingdifyd.worker").warning("still said")
    stream.flush()
    stream.seek(0)
    assert stream.read() == "<4>[hr] dingdifyd.worker: still said\n"


def test_outside_the_journal_lines_are_plain_text(journald, stream):
    setup_logging("INFO", bot="hr", stream=stream, environ={}, journal_socket=journald.path)
    logging.getLogger("dingdifyd.worker").info("plain", extra=event("answered", msg_id="m"))
    stream.flush()
    stream.seek(0)
    assert stream.read().endswith(" INFO [hr] dingdifyd.worker: plain\n")
    journald.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        journald.sock.recv(100)


def test_field_values_with_newlines_use_the_binary_form():
    data = encode_entry({"MESSAGE": "a\nb", "PRIORITY": "6"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\nPRIORITY=6\n"
    with pytest.raises(ValueError):
        encode_entry({"lower": "x"})


@pytest.mark.parametrize(("cgroup", "identifier"), [
    ("0::/system.slice/system-dingdifyd.slice/dingdifyd@hr.service\n", "dingdifyd@hr"),
    ("12:pids:/\n1:name=systemd:/system.slice/dingdifyd.service\n0::/system.slice/dingdifyd.service\n", "dingdifyd"),
    ("0::/user.slice/user-1000.slice/session-3.scope\n", "dingdifyd"),
])  # fmt: skip
def test_the_identifier_is_the_units_name(tmp_path, cgroup, identifier):
    path = tmp_path / "cgroup"
    path.write_text(cgroup)
    assert unit_identifier(str(path)) == identifier
