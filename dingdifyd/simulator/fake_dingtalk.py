"""A loopback fake of DingTalk for the tests, the demo and the benchmarks (reference/protocols.md D.1).

One aiohttp app on 127.0.0.1 serves the Stream gateway (ticket + WebSocket, CALLBACK frames, ACKs, pings,
redelivery of what is not ACKed), the OpenAPI the daemon uses (token, AI cards with DingTalk's validations
and its per-app-per-API QPS limit, robot messages and files), the legacy media upload and session webhooks.
`FakeDingTalk` is at the same time the server and the controller tests drive it through: push messages,
inject failures, read what the daemon did (cards, replies, ACKs) and wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from dingdifyd.simulator.fake_registration import FakeRegistration

log = logging.getLogger(__name__)

CHATBOT_TOPIC = "/v1.0/im/bot/messages/get"
TOKEN_HEADER = "x-acs-dingtalk-access-token"
QPS_LIMIT_CODE = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"

# API names: the keys of `calls`, `qps_rejections` and `fail_next`.
API_GATEWAY_OPEN = "gateway.open"
API_TOKEN = "oauth2.accessToken"
API_CREATE_AND_DELIVER = "card.createAndDeliver"
API_CARD_CREATE = "card.create"
API_CARD_DELIVER = "card.deliver"
API_CARD_UPDATE = "card.update"
API_CARD_STREAMING = "card.streaming"
API_FILE_DOWNLOAD = "robot.messageFiles.download"
API_BATCH_SEND = "robot.oToMessages.batchSend"
API_GROUP_SEND = "robot.groupMessages.send"
API_MEDIA_UPLOAD = "media.upload"
API_WEBHOOK = "webhook"
KNOWN_APIS = frozenset(value for name, value in dict(globals()).items() if name.startswith("API_"))

SESSION_WEBHOOK_TTL_MS = 90 * 60 * 1000
_OPEN_SPACE = re.compile(r"^dtv1\.card//(IM_GROUP|IM_ROBOT|IM_SINGLE|ONE_BOX)\.(.+)$", re.IGNORECASE)
_WEBHOOK_MSGTYPES = frozenset({"text", "markdown", "actionCard", "link", "feedCard"})
_MSG_KEYS = frozenset({
    "sampleText", "sampleMarkdown", "sampleImageMsg", "sampleLink", "sampleActionCard", "sampleActionCard2",
    "sampleActionCard3", "sampleActionCard4", "sampleActionCard5", "sampleActionCard6", "sampleAudio",
    "sampleFile", "sampleVideo",
})
# A 1x1 PNG, the bytes behind the sample picture's downloadCode.
SAMPLE_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360f8cf"
    "c0f01f0005000201e2b3d43a0000000049454e44ae426082"
)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _api_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message, "requestid": _request_id()}, status=status)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


# --- what the controller records ---------------------------------------------------------------------------


@dataclass
class FakeApp:
    client_id: str
    client_secret: str
    robot_code: str
    app_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    denied_scopes: set[str] = field(default_factory=set)  # permissions the app was not granted


@dataclass
class StreamUpdate:
    """One accepted `PUT /v1.0/card/streaming`."""

    key: str
    content: str
    is_full: bool
    is_finalize: bool
    is_error: bool
    guid: str


@dataclass
class FakeCard:
    out_track_id: str
    client_id: str
    template_id: str
    card_param_map: dict[str, str]
    create_body: dict[str, Any]
    delivered: bool = False
    open_space_ids: list[str] = field(default_factory=list)
    timeline: list[StreamUpdate] = field(default_factory=list)
    param_updates: list[dict[str, str]] = field(default_factory=list)
    finalized: bool = False  # a streaming call with isFinalize was accepted
    error: bool = False  # a streaming call with isError was accepted
    shown: dict[str, str] = field(default_factory=dict)  # what each variable shows now (data or stream)
    first_text_at: float | None = None  # when the card first showed answer text (time.monotonic())

    @property
    def flow_status(self) -> str | None:
        """The built-in AI template's state: 1 processing, 2 typing, 3 done, 5 failed."""
        return self.card_param_map.get("flowStatus")

    @property
    def contents(self) -> list[str]:
        """Every streamed content, in order."""
        return [update.content for update in self.timeline]

    @property
    def content_key(self) -> str:
        if self.timeline:
            return self.timeline[-1].key
        return "msgContent" if "msgContent" in self.card_param_map else "content"

    @property
    def text(self) -> str:
        """What the card's main text shows now."""
        return self.shown.get(self.content_key, "")

    @property
    def done(self) -> bool:
        """Finished or failed: by flowStatus on the built-in template (whose last call sets it), else by a
        final streaming call."""
        if self.flow_status is not None:
            return self.flow_status in ("3", "5")
        return self.finalized

    @property
    def failed(self) -> bool:
        if self.flow_status is not None:
            return self.flow_status == "5"
        return self.error

    @property
    def final_content(self) -> str | None:
        return self.text if self.done else None


@dataclass
class Ack:
    message_id: str
    code: int | None
    message: str
    data: str
    raw: dict[str, Any]

    @property
    def response(self) -> Any:
        """The decoded `data` (e.g. {"response": "OK"}), or None if it is not JSON."""
        try:
            return json.loads(self.data)
        except (TypeError, ValueError):
            return None


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
class UploadedMedia:
    media_id: str
    media_type: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class SentMessage:
    api: str
    body: dict[str, Any]


@dataclass
class _Fault:
    status: int
    body: Any
    delay: float


@dataclass
class _Ticket:
    client_id: str
    expires_at: float


@dataclass
class _Pushed:
    message_id: str
    client_id: str
    frame: dict[str, Any]
    deliveries: int = 0
    acked: bool = False
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Connection:
    id: str
    client_id: str
    ws: web.WebSocketResponse
    request: web.Request
    ping_task: asyncio.Task[None] | None = None


@dataclass
class _StoredFile:
    data: bytes
    content_type: str


# --- the fake --------------------------------------------------------------------------------------------


class FakeDingTalk:
    """The fake DingTalk server and its controller. Bind: 127.0.0.1 only; `port=0` picks a free port."""

    def __init__(
        self,
        *,
        port: int = 0,
        token_expire_in: int = 7200,
        ping_interval: float | None = 20.0,
        redeliver_after: float | None = 60.0,
        rate_limit: float | None = 20.0,
        max_stream_content: int = 100_000,
        ticket_ttl: float = 90.0,
        disconnect_grace: float = 10.0,
        templates: set[str] | None = None,
        rng: random.Random | None = None,
    ):
        self.host = "127.0.0.1"
        self.port = port
        self.token_expire_in = token_expire_in
        self.ping_interval = ping_interval
        self.redeliver_after = redeliver_after
        self.rate_limit = rate_limit  # calls per second per (app, API); None: unlimited
        self.max_stream_content = max_stream_content
        self.ticket_ttl = ticket_ttl
        self.disconnect_grace = disconnect_grace
        self.templates = templates  # None: every template id exists
        self._rng = rng or random.Random()

        self.apps: dict[str, FakeApp] = {}
        self.cards: dict[str, FakeCard] = {}
        self.acks: list[Ack] = []
        self.webhook_replies: list[WebhookReply] = []
        self.webhook_rejections: list[WebhookReply] = []
        self.sent_messages: list[SentMessage] = []
        self.uploaded_media: list[UploadedMedia] = []
        self.open_requests: list[dict[str, Any]] = []  # gateway open bodies, secret removed
        self.calls: Counter[str] = Counter()
        self.qps_rejections: Counter[str] = Counter()
        self.token_fetches: Counter[str] = Counter()

        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (client_id, expires_at)
        self._app_token: dict[str, str] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._used_tickets: set[str] = set()
        self._connections: dict[str, _Connection] = {}
        self._pushed: dict[str, _Pushed] = {}
        self._pending: dict[str, deque[_Pushed]] = {}
        self._faults: dict[str, deque[_Fault]] = {}
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._sessions: dict[str, int] = {}  # session -> expiry (ms since the epoch)
        self._files: dict[str, _StoredFile] = {}
        self._download_codes: dict[str, str] = {}
        self._card_listeners: list[Callable[[FakeCard], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        # more routes served next to DingTalk's, added before start() (the simulator's /_sim/ control API)
        self.extra_routes: list[web.AbstractRouteDef] = []
        # the QR-code app registration on the oapi side (dingdifyd setup)
        self.registration = FakeRegistration(self)

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeDingTalk:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1.0/gateway/connections/open", self._gateway_open)
        app.router.add_get("/connect", self._connect)
        app.router.add_post("/v1.0/oauth2/accessToken", self._access_token)
        app.router.add_post("/v1.0/card/instances/createAndDeliver",
                            self._openapi(API_CREATE_AND_DELIVER, self._card_create_and_deliver))
        app.router.add_post("/v1.0/card/instances", self._openapi(API_CARD_CREATE, self._card_create))
        app.router.add_post("/v1.0/card/instances/deliver",
                            self._openapi(API_CARD_DELIVER, self._card_deliver))
        app.router.add_put("/v1.0/card/instances", self._openapi(API_CARD_UPDATE, self._card_update))
        app.router.add_put("/v1.0/card/streaming", self._openapi(API_CARD_STREAMING, self._card_streaming))
        app.router.add_post("/v1.0/robot/messageFiles/download",
                            self._openapi(API_FILE_DOWNLOAD, self._file_download))
        app.router.add_post("/v1.0/robot/oToMessages/batchSend",
                            self._openapi(API_BATCH_SEND, self._batch_send))
        app.router.add_post("/v1.0/robot/groupMessages/send", self._openapi(API_GROUP_SEND, self._group_send))
        app.router.add_post("/robot/sendBySession", self._send_by_session)
        app.router.add_post("/media/upload", self._media_upload)
        app.router.add_get("/files/{file_id}", self._serve_file)
        app.router.add_routes(self.registration.routes())
        app.router.add_routes(self.extra_routes)
        # No access log: its lines would carry session= and access_token= query strings.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("fake DingTalk listening on %s", self.base_url)
        return self

    async def close(self) -> None:
        self._closing.set()
        for pushed in self._pushed.values():
            if pushed.timer is not None:
                pushed.timer.cancel()
        for connection in list(self._connections.values()):
            with contextlib.suppress(Exception):
                await connection.ws.close(code=1001, message=b"server shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDingTalk:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- controller: setup ----------------------------------------------------------------------------

    def register_app(self, client_id: str, client_secret: str, *, robot_code: str | None = None) -> FakeApp:
        app = FakeApp(client_id=client_id, client_secret=client_secret, robot_code=robot_code or client_id)
        self.apps[client_id] = app
        return app

    def fail_next(
        self,
        api: str,
        count: int = 1,
        *,
        status: int = 500,
        code: str = "system.busy",
        message: str = "injected failure",
        body: Any = None,
        delay: float = 0.0,
    ) -> None:
        """Make the next `count` calls of `api` answer `status` with an error body (or `body` as given),
        after `delay` seconds. For the gateway, `body={}` or `{"foo": 1}` with status 200 are the odd shapes
        of protocols.md A.3."""
        if api not in KNOWN_APIS:
            raise ValueError(f"unknown API {api!r}; one of {sorted(KNOWN_APIS)}")
        payload = body if body is not None else {"code": code, "message": message, "requestid": _request_id()}
        queue = self._faults.setdefault(api, deque())
        for _ in range(count):
            queue.append(_Fault(status, payload, delay))

    def revoke_tokens(self, client_id: str | None = None) -> None:
        """Invalidate issued access tokens: the next OpenAPI calls with them get 401."""
        for token, (owner, _) in list(self._tokens.items()):
            if client_id is None or owner == client_id:
                del self._tokens[token]
                self._app_token.pop(owner, None)

    def add_file(self, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Store bytes behind a new downloadCode (for picture/file messages); returns the code."""
        file_id = uuid.uuid4().hex
        self._files[file_id] = _StoredFile(data, content_type)
        code = f"dc{uuid.uuid4().hex}"
        self._download_codes[code] = file_id
        return code

    def add_card_listener(self, listener: Callable[[FakeCard], None]) -> None:
        """Call `listener(card)` after every change of a card (the demo renders with it)."""
        self._card_listeners.append(listener)

    def expire_session(self, session_webhook: str) -> None:
        session = session_webhook.rsplit("session=", 1)[-1]
        if session in self._sessions:
            self._sessions[session] = 0

    # --- controller: messages -------------------------------------------------------------------------

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
        """A robot message payload shaped like protocols.md B.1, whose sessionWebhook points at this fake."""
        app = self._app(client_id)
        now = _now_ms()
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

    def push_message(self, client_id: str, data: dict[str, Any]) -> str:
        """Send a robot message (a CALLBACK frame of the chatbot topic); returns the frame's messageId."""
        return self.push_callback(client_id, CHATBOT_TOPIC, data)

    def push_callback(self, client_id: str, topic: str, data: dict[str, Any]) -> str:
        app = self._app(client_id)
        message_id = f"{uuid.uuid4().hex[:8]}_{next(self._ids)}_{uuid.uuid4().hex[:10]}"
        frame = {
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "appId": app.app_id,
                "connectionId": "",
                "contentType": "application/json",
                "messageId": message_id,
                "time": str(_now_ms()),
                "topic": topic,
            },
            "data": json.dumps(data, ensure_ascii=False),
        }
        pushed = _Pushed(message_id, app.client_id, frame)
        self._pushed[message_id] = pushed
        self._deliver(pushed)
        return message_id

    def push_frame(self, client_id: str, frame: dict[str, Any]) -> str:
        """Send a frame exactly as given (a test's odd one) and redeliver it, like any frame, until it is
        ACKed; returns its headers.messageId."""
        app = self._app(client_id)
        message_id = str(frame["headers"]["messageId"])
        pushed = _Pushed(message_id, app.client_id, frame)
        self._pushed[message_id] = pushed
        self._deliver(pushed)
        return message_id

    def push_raw(self, client_id: str, text: str) -> int:
        """Send `text` as-is to every connection of the app (malformed-frame tests); returns how many."""
        connections = self._live(client_id)
        for connection in connections:
            self._spawn(self._send_text(connection, text))
        return len(connections)

    def push_ping(self, client_id: str | None = None) -> list[str]:
        return [self._send_system(connection, "ping", {"opaque": uuid.uuid4().hex})
                for connection in self._live(client_id)]

    def push_disconnect(self, client_id: str | None = None) -> list[str]:
        """SYSTEM disconnect to every connection; the server closes them `disconnect_grace` s later."""
        message_ids = []
        for connection in self._live(client_id):
            reason = {"reason": "connection is expired"}
            message_ids.append(self._send_system(connection, "disconnect", reason))
            self._spawn(self._close_later(connection, self.disconnect_grace))
        return message_ids

    def drop_connections(self, client_id: str | None = None) -> int:
        """Abort the TCP connections without a close frame; returns how many."""
        connections = self._live(client_id)
        for connection in connections:
            transport = connection.request.transport
            if transport is not None:
                transport.abort()
        return len(connections)

    def redeliver(self, message_id: str) -> None:
        """Send a pushed CALLBACK again, same messageId and data, ACKed or not."""
        self._deliver(self._pushed[message_id])

    def deliveries(self, message_id: str) -> int:
        return self._pushed[message_id].deliveries

    @property
    def connections(self) -> int:
        return len(self._connections)

    def connection_count(self, client_id: str) -> int:
        return len(self._live(client_id))

    def acks_for(self, message_id: str) -> list[Ack]:
        return [ack for ack in self.acks if ack.message_id == message_id]

    # --- controller: waiting --------------------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "a condition"
    ) -> Any:
        """Wait until `predicate()` is truthy (checked after every change the fake sees); return its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"fake DingTalk: timed out waiting for {what}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                # Changes on the client's side are not seen here: look again now and then.
                await asyncio.wait_for(changed.wait(), min(remaining, 0.02))

    async def wait_ack(self, message_id: str, timeout: float = 5.0) -> Ack:
        acks = await self.wait_for(lambda: self.acks_for(message_id), timeout, f"the ACK of {message_id}")
        return acks[0]

    async def wait_connections(
        self, count: int = 1, client_id: str | None = None, timeout: float = 5.0
    ) -> None:
        await self.wait_for(lambda: len(self._live(client_id)) >= count, timeout, f"{count} connection(s)")

    async def wait_card_final(
        self, card: str | Callable[[FakeCard], bool], timeout: float = 5.0
    ) -> FakeCard:
        """Wait for a card to be done (finished or failed), by outTrackId or by a predicate on the card."""
        def find() -> FakeCard | None:
            if isinstance(card, str):
                found = self.cards.get(card)
                return found if found is not None and found.done else None
            return next((c for c in list(self.cards.values()) if c.done and card(c)), None)

        return await self.wait_for(find, timeout, f"card {card if isinstance(card, str) else ''} to finish")

    async def wait_webhook_replies(self, count: int = 1, timeout: float = 5.0) -> list[WebhookReply]:
        await self.wait_for(lambda: len(self.webhook_replies) >= count, timeout, f"{count} webhook replies")
        return list(self.webhook_replies)

    # --- internals: change notification and tasks -----------------------------------------------------

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _card_changed(self, card: FakeCard) -> None:
        if card.first_text_at is None and card.text:
            card.first_text_at = time.monotonic()
        self._touch()
        for listener in self._card_listeners:
            try:
                listener(card)
            except Exception:
                log.exception("card listener failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _app(self, client_id: str | None) -> FakeApp:
        if client_id is None:
            if len(self.apps) != 1:
                raise ValueError("client_id is needed when the fake knows several apps (or none)")
            return next(iter(self.apps.values()))
        return self.apps[client_id]

    def _live(self, client_id: str | None) -> list[_Connection]:
        return [c for c in self._connections.values()
                if (client_id is None or c.client_id == client_id) and not c.ws.closed]

    def _take_fault(self, api: str) -> _Fault | None:
        queue = self._faults.get(api)
        return queue.popleft() if queue else None

    async def _fault_response(self, fault: _Fault) -> web.Response:
        if fault.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.delay)
        return web.json_response(fault.body, status=fault.status)

    def _within_rate(self, client_id: str, api: str) -> bool:
        if self.rate_limit is None:
            return True
        # A sliding one-second window: stricter than a bucket, so a client that passes here passes there.
        now = time.monotonic()
        window = self._windows.setdefault((client_id, api), deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.rate_limit:
            return False
        window.append(now)
        return True

    # --- Stream gateway -------------------------------------------------------------------------------

    async def _gateway_open(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_GATEWAY_OPEN] += 1
        fault = self._take_fault(API_GATEWAY_OPEN)
        if fault is not None:
            return await self._fault_response(fault)
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _api_error(400, "param.invalid", "body is not a JSON object")
        app = self.apps.get(str(body.get("clientId")))
        if app is None or body.get("clientSecret") != app.client_secret:
            return _api_error(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        self.open_requests.append({k: v for k, v in body.items() if k != "clientSecret"})
        ticket = str(uuid.uuid4())
        self._tickets[ticket] = _Ticket(app.client_id, time.monotonic() + self.ticket_ttl)
        self._touch()
        return web.json_response({"endpoint": f"ws://{self.host}:{self.port}/connect", "ticket": ticket})

    async def _connect(self, request: web.Request) -> web.StreamResponse:
        ticket_id = request.query.get("ticket", "")
        if ticket_id in self._used_tickets:
            return _api_error(403, "ticket.used", "ticket already used")
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None:
            return _api_error(401, "ticket.invalid", "unknown ticket")
        self._used_tickets.add(ticket_id)
        if time.monotonic() > ticket.expires_at:
            return _api_error(403, "ticket.expired", "ticket expired")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        connection = _Connection(uuid.uuid4().hex, ticket.client_id, ws, request)
        self._connections[connection.id] = connection
        if self.ping_interval:
            connection.ping_task = asyncio.ensure_future(self._ping_loop(connection, self.ping_interval))
        self._touch()
        pending = self._pending.pop(ticket.client_id, deque())
        while pending:
            self._deliver(pending.popleft())
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self._on_client_frame(message.data)
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            self._connections.pop(connection.id, None)
            if connection.ping_task is not None:
                connection.ping_task.cancel()
            self._touch()
        return ws

    def _on_client_frame(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            log.warning("fake DingTalk: client sent a frame that is not JSON")
            return
        if not isinstance(frame, dict):
            return
        headers = frame.get("headers") if isinstance(frame.get("headers"), dict) else {}
        message_id = str(headers.get("messageId", ""))
        code = frame.get("code")
        self.acks.append(Ack(message_id, code if isinstance(code, int) else None,
                             str(frame.get("message", "")), str(frame.get("data", "")), frame))
        pushed = self._pushed.get(message_id)
        if pushed is not None:
            pushed.acked = True
            if pushed.timer is not None:
                pushed.timer.cancel()
                pushed.timer = None
        self._touch()

    def _deliver(self, pushed: _Pushed) -> None:
        connections = self._live(pushed.client_id)
        if not connections:
            # DingTalk keeps it for the next connection of the app.
            self._pending.setdefault(pushed.client_id, deque()).append(pushed)
            return
        connection = self._rng.choice(connections)
        frame = dict(pushed.frame, headers=dict(pushed.frame["headers"], connectionId=connection.id))
        pushed.deliveries += 1
        self._spawn(self._send_text(connection, json.dumps(frame, ensure_ascii=False)))
        if pushed.timer is not None:
            pushed.timer.cancel()
        if self.redeliver_after is not None and not pushed.acked:
            pushed.timer = asyncio.get_running_loop().call_later(
                self.redeliver_after, self._redeliver_unacked, pushed.message_id
            )

    def _redeliver_unacked(self, message_id: str) -> None:
        pushed = self._pushed[message_id]
        pushed.timer = None
        if not pushed.acked:
            self._deliver(pushed)

    def _send_system(self, connection: _Connection, topic: str, data: dict[str, Any]) -> str:
        message_id = f"sys-{topic}-{next(self._ids)}"
        frame = {
            "specVersion": "1.0",
            "type": "SYSTEM",
            "headers": {"contentType": "application/json", "messageId": message_id, "time": str(_now_ms()),
                        "topic": topic},
            "data": json.dumps(data),
        }
        self._spawn(self._send_text(connection, json.dumps(frame)))
        return message_id

    async def _send_text(self, connection: _Connection, text: str) -> None:
        try:
            await connection.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("fake DingTalk: send to connection %s failed: %s", connection.id, exc)

    async def _ping_loop(self, connection: _Connection, interval: float) -> None:
        while not connection.ws.closed:
            await asyncio.sleep(interval)
            if not connection.ws.closed:
                self._send_system(connection, "ping", {"opaque": uuid.uuid4().hex})

    async def _close_later(self, connection: _Connection, delay: float) -> None:
        await asyncio.sleep(delay)
        if not connection.ws.closed:
            await connection.ws.close()

    # --- token and OpenAPI plumbing -------------------------------------------------------------------

    async def _access_token(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_TOKEN] += 1
        fault = self._take_fault(API_TOKEN)
        if fault is not None:
            return await self._fault_response(fault)
        body = await _json_body(request)
        app = self.apps.get(str(body.get("appKey"))) if isinstance(body, dict) else None
        if app is None or body.get("appSecret") != app.client_secret:
            return _api_error(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        self.token_fetches[app.client_id] += 1
        expires_at = time.monotonic() + self.token_expire_in
        # Asking again inside the validity window returns the same token with its lifetime extended.
        token = self._app_token.get(app.client_id)
        if token is None or token not in self._tokens:
            token = uuid.uuid4().hex
            self._app_token[app.client_id] = token
        self._tokens[token] = (app.client_id, expires_at)
        self._touch()
        return web.json_response({"accessToken": token, "expireIn": self.token_expire_in})

    def _app_for_token(self, token: str | None) -> FakeApp | None:
        entry = self._tokens.get(token or "")
        if entry is None:
            return None
        client_id, expires_at = entry
        if time.monotonic() >= expires_at:
            return None
        return self.apps.get(client_id)

    def _openapi(
        self, api: str, handler: Callable[[FakeApp, Any], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """Token check, call counting, injected failures and the QPS limit around one OpenAPI route."""

        async def route(request: web.Request) -> web.StreamResponse:
            app = self._app_for_token(request.headers.get(TOKEN_HEADER))
            if app is None:
                return _api_error(401, "InvalidAuthentication", "不合法的access_token")
            self.calls[api] += 1
            fault = self._take_fault(api)
            if fault is not None:
                return await self._fault_response(fault)
            denied = self._permission_denied(app, api)
            if denied is not None:
                return denied
            if not self._within_rate(app.client_id, api):
                self.qps_rejections[api] += 1
                self._touch()
                return _api_error(403, QPS_LIMIT_CODE, "app api qps limit exceeded")
            body = await _json_body(request)
            if not isinstance(body, dict):
                return _api_error(400, "param.invalid", "body is not a JSON object")
            return await handler(app, body)

        return route

    # --- cards ----------------------------------------------------------------------------------------

    def _card_problem(self, app: FakeApp, body: dict[str, Any]) -> web.Response | None:
        out_track_id = body.get("outTrackId")
        if not isinstance(out_track_id, str) or not out_track_id:
            return _api_error(400, "param.outTrackIdEmpty", "outTrackId is empty")
        template_id = body.get("cardTemplateId")
        if not isinstance(template_id, str) or not template_id or (
            self.templates is not None and template_id not in self.templates
        ):
            return _api_error(400, "param.templateNotExist", "card template does not exist")
        card_data = body.get("cardData")
        if not isinstance(card_data, dict) or not _is_str_map(card_data.get("cardParamMap", {})):
            return _api_error(400, "param.invalid", "cardData.cardParamMap must map strings to strings")
        if body.get("callbackType", "STREAM") not in ("STREAM", "HTTP"):
            return _api_error(400, "param.invalid", "callbackType must be STREAM or HTTP")
        if out_track_id in self.cards:
            return _api_error(400, "param.cardAlreadyExist", "card already exists")
        return None

    def _delivery_problem(
        self, app: FakeApp, body: dict[str, Any]
    ) -> tuple[web.Response | None, list[tuple[str, str]]]:
        open_space_id = body.get("openSpaceId")
        spaces: list[tuple[str, str]] = []
        for part in open_space_id.split(";") if isinstance(open_space_id, str) and open_space_id else [""]:
            match = _OPEN_SPACE.match(part)
            if match is None:
                return _api_error(400, "param.openSpaceIdInvalid", "openSpaceId is invalid"), []
            spaces.append((match.group(1).upper(), match.group(2)))
        for space_type, _ in spaces:
            if space_type == "IM_GROUP":
                model = body.get("imGroupOpenDeliverModel")
                if not isinstance(model, dict) or model.get("robotCode") != app.robot_code:
                    problem = _api_error(400, "param.invalid", "imGroupOpenDeliverModel.robotCode is invalid")
                    return problem, []
            if space_type == "IM_ROBOT":
                model = body.get("imRobotOpenDeliverModel")
                if not isinstance(model, dict) or model.get("spaceType") != "IM_ROBOT":
                    return _api_error(400, "param.invalid", "imRobotOpenDeliverModel is invalid"), []
        return None, spaces

    def _new_card(self, app: FakeApp, body: dict[str, Any]) -> FakeCard:
        param_map = dict(body["cardData"].get("cardParamMap", {}))
        card = FakeCard(
            out_track_id=body["outTrackId"], client_id=app.client_id, template_id=body["cardTemplateId"],
            card_param_map=param_map, create_body=body, shown=dict(param_map),
        )
        self.cards[card.out_track_id] = card
        return card

    @staticmethod
    def _deliver_results(spaces: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"spaceType": space_type, "spaceId": space_id, "success": True, "carrierId": uuid.uuid4().hex,
                 "errorMsg": ""} for space_type, space_id in spaces]

    def _owned_card(self, app: FakeApp, out_track_id: Any) -> FakeCard | None:
        card = self.cards.get(out_track_id) if isinstance(out_track_id, str) else None
        return card if card is not None and card.client_id == app.client_id else None

    async def _card_create_and_deliver(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._card_problem(app, body)
        if problem is not None:
            return problem
        problem, spaces = self._delivery_problem(app, body)
        if problem is not None:
            return problem
        card = self._new_card(app, body)
        card.delivered = True
        card.open_space_ids = [f"{t}.{i}" for t, i in spaces]
        self._card_changed(card)
        return web.json_response({"success": True, "result": {
            "outTrackId": card.out_track_id, "deliverResults": self._deliver_results(spaces),
        }})

    async def _card_create(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._card_problem(app, body)
        if problem is not None:
            return problem
        card = self._new_card(app, body)
        self._card_changed(card)
        return web.json_response({"success": True, "result": card.out_track_id})

    async def _card_deliver(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        card = self._owned_card(app, body.get("outTrackId"))
        if card is None:
            return _api_error(400, "param.cardNotExist", "card does not exist")
        problem, spaces = self._delivery_problem(app, body)
        if problem is not None:
            return problem
        card.delivered = True
        card.open_space_ids.extend(f"{t}.{i}" for t, i in spaces)
        self._card_changed(card)
        return web.json_response({"success": True, "result": self._deliver_results(spaces)})

    async def _card_update(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        card = self._owned_card(app, body.get("outTrackId"))
        if card is None:
            return _api_error(400, "param.cardNotExist", "card does not exist")
        card_data = body.get("cardData", {})
        params = card_data.get("cardParamMap", {}) if isinstance(card_data, dict) else None
        if not _is_str_map(params):
            return _api_error(400, "param.invalid", "cardData.cardParamMap must map strings to strings")
        options = body.get("cardUpdateOptions")
        by_key = isinstance(options, dict) and options.get("updateCardDataByKey") is True
        if by_key:
            card.card_param_map.update(params)
        else:
            card.card_param_map = dict(params)
        card.shown.update(params)
        card.param_updates.append(dict(params))
        self._card_changed(card)
        return web.json_response({"success": True, "result": True})

    async def _card_streaming(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        required = (("outTrackId", "param.stream.outTrackId"), ("guid", "param.stream.guidEmpty"),
                    ("key", "param.stream.keyEmpty"), ("content", "param.stream.contentEmpty"))
        for field_name, code in required:
            value = body.get(field_name)
            if not isinstance(value, str) or not value:
                return _api_error(400, code, f"{field_name} is empty")
        card = self._owned_card(app, body["outTrackId"])
        if card is None:
            return _api_error(400, "param.stream.outTrackId", "card is not exist")
        is_full = body.get("isFull")
        if is_full is None:
            return _api_error(400, "param.stream.isFull", "streaming update the parameter isFull is null")
        if is_full is not True:
            # Markdown-bound variables only take full updates (protocols.md B.5).
            return _api_error(400, "param.stream.isFull", "isFull must be true for a markdown variable")
        content = body["content"]
        if len(content.encode()) > self.max_stream_content:
            return _api_error(400, "param.stream.content", "content is too large")
        if card.finalized:
            return _api_error(400, "param.stream.finished", "card streaming is already finished")
        update = StreamUpdate(body["key"], content, True, body.get("isFinalize") is True,
                              body.get("isError") is True, body["guid"])
        card.timeline.append(update)
        card.shown[update.key] = content
        card.finalized = update.is_finalize or update.is_error
        card.error = update.is_error
        self._card_changed(card)
        return web.json_response({"success": True, "result": True})

    # --- robot messages and files ---------------------------------------------------------------------

    async def _file_download(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        file_id = self._download_codes.get(str(body.get("downloadCode")))
        if file_id is None:
            return _api_error(400, "invalidParameter.downloadCode", "downloadCode is invalid")
        if body.get("robotCode") != app.robot_code:
            return _api_error(400, "invalidParameter.robotCode.auth", "robotCode is invalid")
        return web.json_response({"downloadUrl": f"{self.base_url}/files/{file_id}"})

    async def _serve_file(self, request: web.Request) -> web.StreamResponse:
        stored = self._files.get(request.match_info["file_id"])
        if stored is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=stored.data, content_type=stored.content_type)

    def _robot_message_problem(self, app: FakeApp, body: dict[str, Any]) -> web.Response | None:
        if body.get("robotCode") != app.robot_code:
            return _api_error(400, "invalidParameter.robotCode.auth", "robotCode is invalid")
        if body.get("msgKey") not in _MSG_KEYS:
            return _api_error(400, "invalidParameter.msgKey.invalid", "msgKey is invalid")
        param = body.get("msgParam")
        try:
            decoded = json.loads(param) if isinstance(param, str) else None
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            return _api_error(400, "invalidParameter.msgParam.invalid", "msgParam must be a JSON string")
        return None

    async def _batch_send(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._robot_message_problem(app, body)
        if problem is not None:
            return problem
        user_ids = body.get("userIds")
        if not isinstance(user_ids, list) or not user_ids:
            return _api_error(400, "invalidParameter.userIds.empty", "userIds is empty")
        if len(user_ids) > 20:
            return _api_error(400, "invalidParameter.userIds.overMax", "at most 20 userIds")
        self.sent_messages.append(SentMessage(API_BATCH_SEND, body))
        self._touch()
        return web.json_response({"processQueryKey": uuid.uuid4().hex, "invalidStaffIdList": [],
                                  "flowControlledStaffIdList": [], "filteredStaffIdList": []})

    async def _group_send(self, app: FakeApp, body: dict[str, Any]) -> web.StreamResponse:
        problem = self._robot_message_problem(app, body)
        if problem is not None:
            return problem
        if not isinstance(body.get("openConversationId"), str) or not body["openConversationId"]:
            return _api_error(400, "invalid.openConversationId", "openConversationId is invalid")
        self.sent_messages.append(SentMessage(API_GROUP_SEND, body))
        self._touch()
        return web.json_response({"processQueryKey": uuid.uuid4().hex})

    async def _send_by_session(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_WEBHOOK] += 1
        fault = self._take_fault(API_WEBHOOK)
        if fault is not None:
            return await self._fault_response(fault)
        session = request.query.get("session", "")
        body = await _json_body(request)
        reply = WebhookReply(session, body if isinstance(body, dict) else {})
        expires = self._sessions.get(session)
        if expires is None:
            errcode, errmsg = 300001, "session does not exist"
        elif _now_ms() > expires:
            errcode, errmsg = 300002, "session expired"
        elif reply.msgtype not in _WEBHOOK_MSGTYPES or not isinstance(body.get(reply.msgtype), dict):
            errcode, errmsg = 40035, "invalid message body"
        else:
            errcode, errmsg = 0, "ok"
        (self.webhook_replies if errcode == 0 else self.webhook_rejections).append(reply)
        self._touch()
        return web.json_response({"errcode": errcode, "errmsg": errmsg})

    async def _media_upload(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_MEDIA_UPLOAD] += 1
        fault = self._take_fault(API_MEDIA_UPLOAD)
        if fault is not None:
            return await self._fault_response(fault)
        if self._app_for_token(request.query.get("access_token")) is None:
            return web.json_response({"errcode": 40014, "errmsg": "不合法的access_token"})
        form = await request.post()
        media = form.get("media")
        if not isinstance(media, web.FileField):
            return web.json_response({"errcode": 41001, "errmsg": "missing media"})
        media_type = str(form.get("type") or request.query.get("type") or "")
        if media_type not in ("image", "voice", "video", "file"):
            return web.json_response({"errcode": 40004, "errmsg": "invalid media type"})
        uploaded = UploadedMedia(f"@lA{uuid.uuid4().hex}", media_type, media.filename,
                                 media.content_type, media.file.read())
        self.uploaded_media.append(uploaded)
        self._touch()
        return web.json_response({"errcode": 0, "errmsg": "ok", "type": media_type,
                                  "media_id": uploaded.media_id, "created_at": _now_ms()})

    # --- permissions ------------------------------------------------------------------------------------

    def deny_scopes(self, client_id: str, *scopes: str) -> None:
        """Take permissions away from an app (e.g. "Card.Streaming.Write"): its calls that need one get
        DingTalk's 403 Forbidden.AccessDenied.AccessTokenPermissionDenied naming the required scope."""
        self.apps[client_id].denied_scopes.update(scopes)

    def _permission_denied(self, app: FakeApp, api: str) -> web.Response | None:
        scope = API_SCOPES.get(api)
        if scope is None or scope not in app.denied_scopes:
            return None
        body = {
            "code": PERMISSION_DENIED_CODE,
            "message": "没有调用该接口的权限，接口权限申请参考：https://open.dingtalk.com/document/orgapp/add-api-permission",
            "requestid": _request_id(),
            "accessdenieddetail": {"requiredScopes": [scope]},
        }
        return web.json_response(body, status=403)


PERMISSION_DENIED_CODE = "Forbidden.AccessDenied.AccessTokenPermissionDenied"
# The permission (scope) each OpenAPI call needs, as the developer console names them.
API_SCOPES = {
    API_CREATE_AND_DELIVER: "Card.Instance.Write",
    API_CARD_CREATE: "Card.Instance.Write",
    API_CARD_DELIVER: "Card.Instance.Write",
    API_CARD_UPDATE: "Card.Instance.Write",
    API_CARD_STREAMING: "Card.Streaming.Write",
    API_FILE_DOWNLOAD: "qyapi_robot_sendmsg",
    API_BATCH_SEND: "qyapi_robot_sendmsg",
    API_GROUP_SEND: "qyapi_robot_sendmsg",
}


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        return None
