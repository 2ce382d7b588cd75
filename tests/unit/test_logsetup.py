from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from dingdifyd.config import Secret
from dingdifyd.logs.setup import NOISY_LOGGERS, register_secret, setup_logging

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging rewires the root logger: give it back to pytest afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sdk = [name for name in logging.root.manager.loggerDict if name.startswith("dingtalk_stream")]
    levels = {name: logging.getLogger(name).level for name in [*NOISY_LOGGERS, *sdk]}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as file:
        yield file


def journal_env(stream: TextIO) -> dict[str, str]:
    status = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def test_journal_lines_carry_priority_prefixes_and_no_timestamp(stream: TextIO) -> None:
    setup_logging("DEBUG", bot="helpdesk", stream=stream, environ=journal_env(stream), journal_socket=None)
    log = logging.getLogger("dingdifyd.bridge.service")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert lines(stream) == [
        "<7>[helpdesk] dingdifyd.bridge.service: d",
        "<6>[helpdesk] dingdifyd.bridge.service: i",
        "<4>[helpdesk] dingdifyd.bridge.service: w",
        "<3>[helpdesk] dingdifyd.bridge.service: e",
        "<2>[helpdesk] dingdifyd.bridge.service: c",
    ]


def test_every_traceback_line_gets_the_prefix(stream: TextIO) -> None:
    setup_logging("INFO", bot="helpdesk", stream=stream, journal=True, journal_socket=None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("dingdifyd.worker").exception("bot crashed")
    output = lines(stream)
    assert len(output) > 3
    assert all(line.startswith("<3>") for line in output), output
    assert output[-1] == "<3>RuntimeError: boom"


def test_without_the_journal_lines_are_timestamped_and_name_the_supervisor(stream: TextIO) -> None:
    setup_logging("INFO", stream=stream, environ={})
    logging.getLogger("dingdifyd.supervisor.arbiter").info("helpdesk: started (pid %d)", 42)
    (line,) = lines(stream)
    assert TIMESTAMP.match(line), line
    assert line.endswith("INFO [supervisor] dingdifyd.supervisor.arbiter: helpdesk: started (pid 42)")
    assert not line.startswith("<")


def test_journal_stream_naming_another_file_is_ignored(stream: TextIO, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("")
    status = os.stat(other)
    setup_logging("INFO", bot="hr", stream=stream, environ={"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"})
    logging.getLogger("x").info("hello")
    (line,) = lines(stream)
    assert TIMESTAMP.match(line) and "[hr] x: hello" in line


def test_level_filters_and_a_second_setup_replaces_the_first(stream: TextIO, tmp_path: Path) -> None:
    setup_logging("WARNING", bot="helpdesk", stream=stream, journal=True, journal_socket=None)
    with open(tmp_path / "second", "w+", encoding="utf-8") as second:
        setup_logging("INFO", bot="hr", stream=second, journal=True, journal_socket=None)
        logging.getLogger("x").info("only once, in the second")
        assert lines(second) == ["<6>[hr] x: only once, in the second"]
    assert lines(stream) == []
    assert len(logging.getLogger().handlers) == 1


def test_registered_secrets_and_tokens_are_redacted(stream: TextIO) -> None:
    setup_logging("DEBUG", bot="helpdesk", stream=stream, journal=True, journal_socket=None)
    register_secret("dingSecretValue-7f3a9c")
    register_secret(Secret("app-difyKeyValue-55aa"))
    register_secret("ab")  # too short to redact safely: ignored
    log = logging.getLogger("dingdifyd.dingtalk.api")
    log.info("client secret %s refused", "dingSecretValue-7f3a9c")
    log.info("GET https://oapi.dingtalk.com/media/upload?access_token=tok123456&type=image")
    log.warning("Authorization: Bearer app-otherkey-999 refused")
    log.error('response.text={"accessToken": "abcdef123456", "expireIn": 7200}')
    log.info("key app-difyKeyValue-55aa, tab ab")
    output = "\n".join(lines(stream))
    for leaked in ("dingSecretValue-7f3a9c", "tok123456", "app-otherkey-999", "abcdef123456", "difyKeyValue"):
        assert leaked not in output
    assert "client secret **** refused" in output
    assert "access_token=****&type=image" in output
    assert "Bearer **** refused" in output
    assert '"accessToken": "****"' in output
    assert "key ****, tab ab" in output


def test_secrets_in_tracebacks_are_redacted(stream: TextIO) -> None:
    setup_logging("INFO", bot="helpdesk", stream=stream, journal=False)
    register_secret("tracebackSecret-0042")
    try:
        raise ValueError("bad key tracebackSecret-0042")
    except ValueError:
        logging.getLogger("x").exception("failed")
    output = "\n".join(lines(stream))
    assert "ValueError: bad key ****" in output
    assert "tracebackSecret-0042" not in output


def test_the_sdk_logs_once_through_our_handler_and_only_warnings(stream: TextIO) -> None:
    from dingtalk_stream.log import setup_default_logger

    early = setup_default_logger("dingtalk_stream.early")  # created before our setup: it has its own handler
    setup_logging("INFO", bot="helpdesk", stream=stream, journal=True, journal_socket=None)
    late = setup_default_logger("dingtalk_stream.client")  # re-sets its level to INFO, as the SDK does
    for logger in (early, late):
        logger.info("endpoint is %s", {"ticket": "t"})
        logger.warning("unknown message topic")
    assert lines(stream) == [
        "<4>[helpdesk] dingtalk_stream.early: unknown message topic",
        "<4>[helpdesk] dingtalk_stream.client: unknown message topic",
    ]
    assert early.handlers == [] and late.handlers == []


def test_a_malformed_third_party_call_neither_raises_nor_is_lost(stream: TextIO) -> None:
    setup_logging("INFO", bot="helpdesk", stream=stream, journal=True, journal_socket=None)
    logging.getLogger("dingtalk_stream.client").error("unknown exception", ValueError("x"))  # the SDK does this
    (line,) = lines(stream)
    assert line.startswith("<3>[helpdesk] dingtalk_stream.client: unknown exception")
