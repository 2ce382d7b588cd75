"""Messages that must not reach Dify as they are: the pure rules of dingdifyd.bridge.intake."""

from __future__ import annotations

import logging

from dingdifyd.bridge import intake
from dingdifyd.dingtalk.stream import parse_incoming


def message(**fields):
    data = {
        "msgId": "msg1", "msgtype": "text", "text": {"content": "hello"}, "conversationId": "cid1",
        "conversationType": "1", "senderStaffId": "staff1", "senderId": "$:LWCP_v1:$abc", "robotCode": "ding1",
    }  # fmt: skip
    data.update(fields)
    parsed = parse_incoming({k: v for k, v in data.items() if v is not None})
    assert parsed is not None
    return parsed


def test_an_ordinary_message_goes_on():
    assert intake.answerable(message())
    assert intake.refusal(message(), max_chars=100) is None


def test_without_a_sender_or_a_conversation_there_is_nobody_to_answer():
    assert not intake.answerable(message(senderStaffId=None, senderId=None))
    assert not intake.answerable(message(conversationId=None))
    assert intake.answerable(message(senderStaffId=None))  # the encrypted sender id is enough


def test_a_dingtalk_error_instead_of_content_is_explained_and_logged_without_text(caplog):
    caplog.set_level(logging.INFO)
    quota = message(text=None, errorMessage="robot message quota exhausted (20001)")
    assert intake.delivery_error(quota) == "robot message quota exhausted (20001)"
    assert intake.refusal(quota, max_chars=100) == intake.DINGTALK_ERROR
    assert "quota exhausted" in caplog.text  # DingTalk's words, useful to the admin


def test_a_message_longer_than_the_limit_is_refused_with_its_length(caplog):
    caplog.set_level(logging.INFO)
    long_text = "secret-words-" * 10_000
    reply = intake.refusal(message(text={"content": long_text}), max_chars=20_000)
    assert reply is not None
    assert "130,000" in reply and "20,000" in reply
    assert "secret-words" not in caplog.text  # the text itself never reaches the log
    assert intake.refusal(message(text={"content": "x" * 20_000}), max_chars=20_000) is None
