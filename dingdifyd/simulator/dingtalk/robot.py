"""Robot messages both ways: the payload of a message DingTalk pushes to the robot (with its session webhook),
the session webhook the daemon answers through (`POST /robot/sendBySession?session=`), and the robot send APIs
(`oToMessages/batchSend`, `groupMessages/send`) (docs/dingtalk.md#robot-messages,
docs/dingtalk.md#session-webhook, docs/dingtalk.md#robot-send-api)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dingtalk.core import (
    API_BATCH_SEND,
    API_GROUP_SEND,
    API_WEBHOOK,
    FakeApp,
    api_error,
    now_ms,
    read_json,
)
from dingdifyd.simulator.dingtalk.media import SAMPLE_PNG, MediaRoutes

SESSION_WEBHOOK_TTL_MS = 90 * 60 * 1000
_WEBHOOK_MSGTYPES = frozenset({"text", "markdown", "actionCard", "link", "feedCard"})
_MSG_KEYS = frozenset({
    "sampleText", "sampleMarkdown", "sampleImageMsg", "sampleLink", "sampleActionCard", "sampleActionCard2",
    "sampleActionCard3", "sampleActionCard4", "sampleActionCard5", "sampleActionCard6", "sampleAudio",
    "sampleFile", "sampleVideo",
})


@dataclass
class WebhookReply:
    session: str
    body: dict[str, Any]

    @property
    def msgtype(self) -> str:
        return str(self.body.get("msgtype", ""))

    @property
    def text(self) -> str:
        """The markdown text, or the text content."""
        part = self.body.get(self.msgtype)
        if isinstance(part, dict):
            return str(part.get("text", part.get("content", "")))
        return ""


@dataclass
class SentMessage:
    api: str
    body: dict[str, Any]


class RobotRoutes(MediaRoutes):
    def __init__(self, **options: Any):
        super().__init__(**options)
        self.webhook_replies: list[WebhookReply] = []
        self.webhook_rejections: list[WebhookReply] = []
        self.sent_messages: list[SentMessage] = []
        self._sessions: dict[str, int] = {}  # session -> expiry (ms since the epoch)

    def _robot_routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1.0/robot/oToMessages/batchSend", self._openapi(API_BATCH_SEND, self._batch_send)),
            web.post("/v1.0/robot/groupMessages/send", self._openapi(API_GROUP_SEND, self._group_send)),
            web.post("/robot/sendBySession", self._send_by_session),
        ]

    # --- controls: the messages a user sends ------------------------------------------------------------

    def make_message(
        self,
        msgtype: str = "text",
        *,
        text: str | None = None,
        content: dict[str, Any] | None = None,
        sender_staff_id: str = "user001",
        sender_nick: str = "Tester",
        group: bool = False,
        conversation_id: str | None = None,
        conversation_title: str = "Test group",
        msg_id: str | None = None,
        client_id: str | None = None,
        sender_corp_id: str = "dingcorp001",
        webhook_expires_ms: int | None = None,
    ) -> dict[str, Any]:
        """A robot message payload (docs/dingtalk.md#robot-messages) whose sessionWebhook points at this fake."""
        app = self._app(client_id)
        now = now_ms()
        session = uuid.uuid4().hex
        expires = webhook_expires_ms if webhook_expires_ms is not None else now + SESSION_WEBHOOK_TTL_MS
        self._sessions[session] = expires
        sender_hash = hashlib.sha256(f"{sender_corp_id}:{sender_staff_id}".encode()).hexdigest()
        sender_id = "$:LWCP_v1:$" + sender_hash[:24]
        bot_id = "$:LWCP_v1:$" + hashlib.sha256(app.robot_code.encode()).hexdigest()[:24]
        data: dict[str, Any] = {
            "conversationId": conversation_id or (f"cidGROUP{uuid.uuid4().hex[:12]}==" if group
                                                  else f"cid{sender_staff_id}=="),
            "chatbotCorpId": sender_corp_id,
            "chatbotUserId": bot_id,
            "msgId": msg_id or f"msg{uuid.uuid4().hex}==",
            "senderNick": sender_nick,
            "isAdmin": False,
            "senderStaffId": sender_staff_id,
            "sessionWebhookExpiredTime": expires,
            "createAt": now,
            "senderCorpId": sender_corp_id,
            "conversationType": "2" if group else "1",
            "senderId": sender_id,
            "sessionWebhook": f"{self.base_url}/robot/sendBySession?session={session}",
            "robotCode": app.robot_code,
            "msgtype": msgtype,
        }
        if group:
            data["conversationTitle"] = conversation_title
            data["isInAtList"] = True
            data["atUsers"] = [{"dingtalkId": bot_id}]
        if msgtype == "text":
            if text is not None:
                # In groups DingTalk strips the @mention and leaves its space.
                data["text"] = {"content": f" {text}" if group else text}
        else:
            data["content"] = content if content is not None else self._sample_content(msgtype, text)
        return data

    def make_text_message(self, text: str, **kwargs: Any) -> dict[str, Any]:
        return self.make_message("text", text=text, **kwargs)

    def make_quota_exhausted_message(self, **kwargs: Any) -> dict[str, Any]:
        """What arrives once the org's robot message quota is used up: a text message without text."""
        data = self.make_message("text", **kwargs)
        data["errorMessage"] = "robot message quota exhausted (20001)"
        return data

    def _sample_content(self, msgtype: str, text: str | None) -> dict[str, Any]:
        if msgtype == "picture":
            code = self.add_file(SAMPLE_PNG, content_type="image/png")
            return {"pictureDownloadCode": f"p{code}", "downloadCode": code}
        if msgtype == "richText":
            code = self.add_file(SAMPLE_PNG, content_type="image/png")
            return {"richText": [
                {"text": text or "Here is the picture:"},
                {"pictureDownloadCode": f"p{code}", "downloadCode": code, "type": "picture"},
                {"text": "What is in it?"},
            ]}
        if msgtype == "audio":
            code = self.add_file(b"#!AMR\n", content_type="audio/amr")
            return {"downloadCode": code, "recognition": text or "hello from a voice message",
                    "duration": 2000}
        if msgtype == "video":
            code = self.add_file(b"\x00\x00\x00\x18ftypmp42", content_type="video/mp4")
            return {"duration": "5", "videoType": "mp4", "downloadCode": code}
        if msgtype == "file":
            code = self.add_file(b"hello file\n", content_type="text/plain")
            return {"spaceId": "223573", "fileName": "notes.txt", "downloadCode": code, "fileId": "117848"}
        return {"unknownMsgType": "用户发送了一条消息，机器人暂不支持接收。"}

    def expire_session(self, session_webhook: str) -> None:
        session = session_webhook.rsplit("session=", 1)[-1]
        if session in self._sessions:
            self._sessions[session] = 0

    async def wait_webhook_replies(self, count: int = 1, timeout: float = 5.0) -> list[WebhookReply]:
        await self.wait_for(lambda: len(self.webhook_replies) >= count, timeout, f"{count} webhook replies")
        return list(self.webhook_replies)

    # --- what the robot sends ---------------------------------------------------------------------------

    def _robot_message_problem(self, app: FakeApp, body: dict[str, Any]) -> web.Response | None:
        if body.get("robotCode") != app.robot_code:
            return api_error(400, "invalidParameter.robotCode.auth", "robotCode is invalid")
        if body.get("msgKey") not in _MSG_KEYS:
            return api_error(400, "invalidParameter.msgKey.invalid", "msgKey is invalid")
        param = body.get("msgParam")
        try:
            decoded = json.loads(param) if isinstance(param, str) else None
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            return api_error(400, "invalidParameter.msgParam.invalid", "msgParam must be a JSON string")
        return None

    async def _batch_send(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._robot_message_problem(app, body)
        if problem is not None:
            return problem
        user_ids = body.get("userIds")
        if not isinstance(user_ids, list) or not user_ids:
            return api_error(400, "invalidParameter.userIds.empty", "userIds is empty")
        if len(user_ids) > 20:
            return api_error(400, "invalidParameter.userIds.overMax", "at most 20 userIds")
        self.sent_messages.append(SentMessage(API_BATCH_SEND, body))
        self._touch()
        return web.json_response({"processQueryKey": uuid.uuid4().hex, "invalidStaffIdList": [],
                                  "flowControlledStaffIdList": [], "filteredStaffIdList": []})

    async def _group_send(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._robot_message_problem(app, body)
        if problem is not None:
            return problem
        if not isinstance(body.get("openConversationId"), str) or not body["openConversationId"]:
            return api_error(400, "invalid.openConversationId", "openConversationId is invalid")
        self.sent_messages.append(SentMessage(API_GROUP_SEND, body))
        self._touch()
        return web.json_response({"processQueryKey": uuid.uuid4().hex})

    async def _send_by_session(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_WEBHOOK] += 1
        fault = self._take_fault(API_WEBHOOK)
        if fault is not None:
            return await self._fault_response(fault)
        session = request.query.get("session", "")
        body = await read_json(request)
        reply = WebhookReply(session, body if isinstance(body, dict) else {})
        expires = self._sessions.get(session)
        if expires is None:
            errcode, errmsg = 300001, "session does not exist"
        elif now_ms() > expires:
            errcode, errmsg = 300002, "session expired"
        elif reply.msgtype not in _WEBHOOK_MSGTYPES or not isinstance(body.get(reply.msgtype), dict):
            errcode, errmsg = 40035, "invalid message body"
        else:
            errcode, errmsg = 0, "ok"
        (self.webhook_replies if errcode == 0 else self.webhook_rejections).append(reply)
        self._touch()
        return web.json_response({"errcode": errcode, "errmsg": errmsg})
