"""Robot message payloads (docs/dingtalk.md#robot-messages) → IncomingMessage, and the frame checks done before
the SDK."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from dingdifyd.dingtalk.stream import _frame_problem, parse_incoming

# The official 1:1 text sample of B.1.
TEXT_SAMPLE: dict[str, Any] = {
    "conversationId": "cide****4g=", "chatbotCorpId": "ding****6741", "chatbotUserId": "$:LWC****ihY/",
    "msgId": "msgY****Pw==", "senderNick": "张三", "isAdmin": True, "senderStaffId": "042***297",
    "sessionWebhookExpiredTime": 1695289035996, "createAt": 1695283635765, "senderCorpId": "ding****6741",
    "conversationType": "1", "senderId": "$:LWC****PA==",
    "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=79b48****4d4b",
    "robotCode": "ding****c6gk", "msgtype": "text", "text": {"content": "hello DingTalk!"},
}


def sample(msgtype: str, **fields: Any) -> dict[str, Any]:
    data = copy.deepcopy(TEXT_SAMPLE)
    data.pop("text")
    data["msgtype"] = msgtype
    data.update(fields)
    return data


def test_text_message_keeps_every_field():
    message = parse_incoming(TEXT_SAMPLE)
    assert message is not None
    assert message.robot_code == "ding****c6gk"
    assert message.msg_id == "msgY****Pw=="
    assert message.msg_type == "text"
    assert message.text == "hello DingTalk!"
    assert message.conversation_id == "cide****4g="
    assert message.conversation_type == "1"
    assert not message.is_group
    assert message.sender_id == "$:LWC****PA=="
    assert message.sender_staff_id == "042***297"
    assert message.sender_nick == "张三"
    assert message.sender_corp_id == "ding****6741"
    assert message.session_webhook.endswith("session=79b48****4d4b")
    assert message.session_webhook_expires_ms == 1695289035996
    assert message.created_at_ms == 1695283635765
    assert message.user_id == "042***297"


def test_group_text_loses_the_space_left_by_the_mention():
    data = dict(TEXT_SAMPLE, conversationType="2", conversationTitle="Ops", isInAtList=True,
                text={"content": " what is up?"})
    message = parse_incoming(data)
    assert message is not None
    assert message.is_group
    assert message.text == "what is up?"
    assert message.conversation_title == "Ops"


def test_picture_has_no_text_and_keeps_its_download_code():
    content = {"pictureDownloadCode": "pWjA", "downloadCode": "mIof"}
    message = parse_incoming(sample("picture", content=content))
    assert message is not None
    assert message.msg_type == "picture"
    assert message.text == ""
    assert message.content["downloadCode"] == "mIof"


def test_rich_text_joins_its_text_parts():
    rich = [{"text": "这个问题示例图如下："},
            {"pictureDownloadCode": "pWjA", "downloadCode": "mIof7A==", "type": "picture"},
            {"text": "通过以上示意图可以明白完整的交互流程"}, {"text": "  "}]
    message = parse_incoming(sample("richText", content={"richText": rich}))
    assert message is not None
    assert message.text == "这个问题示例图如下：\n通过以上示意图可以明白完整的交互流程"
    assert message.content["richText"][1]["downloadCode"] == "mIof7A=="


def test_audio_uses_the_recognition():
    content = {"downloadCode": "mIof", "recognition": "钉钉PaaS开放中心"}
    message = parse_incoming(sample("audio", content=content))
    assert message is not None
    assert message.text == "钉钉PaaS开放中心"


@pytest.mark.parametrize(("msgtype", "content"), [
    ("video", {"duration": "5", "videoType": "mp4", "downloadCode": "mIofSaqP"}),
    ("file", {"spaceId": "223", "fileName": "foobar.zip", "downloadCode": "LJYY", "fileId": "117"}),
    ("unknownMsgType", {"unknownMsgType": "用户发送了一条消息，机器人暂不支持接收。"}),
    ("someFutureType", {"whatever": 1}),
])
def test_types_without_text_parse_with_empty_text(msgtype: str, content: dict[str, Any]):
    message = parse_incoming(sample(msgtype, content=content))
    assert message is not None
    assert message.msg_type == msgtype
    assert message.text == ""
    assert message.content == content


def test_quota_exhausted_shape_without_text_parses():
    data = sample("text", errorMessage="robot message quota exhausted (20001)")
    message = parse_incoming(data)
    assert message is not None
    assert message.text == ""
    assert message.content["errorMessage"] == "robot message quota exhausted (20001)"


@pytest.mark.parametrize("data", [
    None, "text", [], 42, {}, {"msgtype": "text", "text": {"content": "no id"}},
])
def test_payloads_without_a_message_id_are_refused(data: Any):
    assert parse_incoming(data) is None


def test_wrongly_typed_fields_fall_back_to_defaults():
    data = {
        "msgId": "m1", "msgtype": "text", "text": "not a dict", "conversationType": 2,
        "createAt": "1700000000000",
        "sessionWebhookExpiredTime": "soon", "senderNick": None, "content": ["not", "a", "dict"],
    }
    message = parse_incoming(data, default_robot_code="dingfallback")
    assert message is not None
    assert message.text == ""
    assert message.conversation_type == "2"
    assert message.created_at_ms == 1700000000000
    assert message.session_webhook_expires_ms == 0
    assert message.sender_nick == ""
    assert message.content == {}
    assert message.robot_code == "dingfallback"


def test_rich_text_with_odd_items_does_not_raise():
    odd = ["x", {"text": 5}, None, {"text": "ok"}]
    message = parse_incoming(sample("richText", content={"richText": odd}))
    assert message is not None
    assert message.text == "5\nok"
    assert parse_incoming(sample("richText", content={"richText": "nope"})).text == ""


def frame(**overrides: Any) -> dict[str, Any]:
    base = {"specVersion": "1.0", "type": "CALLBACK",
            "headers": {"messageId": "m1", "time": "1690362102194", "topic": "/v1.0/im/bot/messages/get"},
            "data": json.dumps({"msgId": "x"})}
    base.update(overrides)
    return base


def test_a_well_formed_frame_passes():
    assert _frame_problem(frame()) is None
    assert _frame_problem(frame(data="")) is None


@pytest.mark.parametrize(("bad", "problem"), [
    (["a", "list"], "not a JSON object"),
    (frame(headers="x"), "no headers object"),
    (frame(headers={"messageId": "m1", "time": "yesterday"}), "non-numeric headers.time"),
    (frame(data={"msgId": "x"}), "data is not a JSON string"),
    (frame(data="{broken"), "data is not valid JSON"),
])
def test_frames_the_sdk_would_choke_on_are_named(bad: Any, problem: str):
    assert _frame_problem(bad) == problem


@pytest.mark.parametrize("kind", [None, "", "3", "group", 1.5])
def test_a_missing_or_unknown_conversation_type_is_a_group_never_a_one_to_one(kind: Any):
    data = copy.deepcopy(TEXT_SAMPLE)
    if kind is None:
        data.pop("conversationType")
    else:
        data["conversationType"] = kind
    message = parse_incoming(data)
    assert message is not None
    assert message.is_group  # fail closed: the group rules (allow_groups, deny_groups) apply
