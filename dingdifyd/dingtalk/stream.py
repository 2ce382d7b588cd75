"""The DingTalk Stream connection: the only module that imports the dingtalk-stream SDK.

The SDK (0.24.3) is used for what it does well: frame parsing, routing and building the ACKs. Its `start()`
is replaced, because it blocks the loop (`requests`, no timeout), swallows cancellation, dies on an early
error and sleeps a fixed 10 s between attempts (docs/dingtalk.md#sdk-pitfalls). Here the ticket is fetched
with aiohttp under a timeout, reconnects back off exponentially with jitter, a malformed frame is logged
and skipped, and cancelling `run()` ends it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import dingtalk_stream
import websockets

# The SDK's `except (..., websockets.exceptions.ConnectionClosedError)` raises AttributeError unless this
# submodule was imported before it runs (docs/dingtalk.md#sdk-pitfalls, 3): importing it here, with the SDK, is enough.
import websockets.exceptions
from dingtalk_stream.version import VERSION_STRING

from dingdifyd.bridge.recent import RecentIds
from dingdifyd.config import Secret
from dingdifyd.dingtalk.api import exchange
from dingdifyd.errors import DingTalkAuthError, DingTalkError
from dingdifyd.models import GROUP_CHAT, SINGLE_CHAT, IncomingMessage
from dingdifyd.pacing.backoff import Backoff

log = logging.getLogger(__name__)

# The SDK's handler classes attach a StreamHandler to their loggers unless one is found up the tree; a
# NullHandler here stops that, and their records still propagate to whatever logging the daemon set up.
logging.getLogger("dingtalk_stream").addHandler(logging.NullHandler())

STATE_CONNECTED = "connected"
STATE_DISCONNECTED = "disconnected"


class _SdkLogFilter(logging.Filter):
    """0.24.3 warns about every SYSTEM ping ("unknown message topic") and puts whole frames, message text
    included, into some lines. Drop the former; replace frames by their messageId in the latter."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping) and args:
            # logging unpacks a lone mapping argument (`log.warning("... %s", frame)`) into record.args itself
            record.args = (_frame_summary(args),)
            return True
        if not isinstance(args, tuple) or not args:
            return True
        if str(record.msg).startswith("unknown message topic") and args[0] == "ping":
            return False
        if any(isinstance(arg, Mapping) for arg in args):
            record.args = tuple(_frame_summary(arg) if isinstance(arg, Mapping) else arg for arg in args)
        return True


def _frame_summary(frame: Mapping[str, Any]) -> str:
    headers = frame.get("headers")
    message_id = headers.get("messageId") if isinstance(headers, Mapping) else None
    return f"<frame {frame.get('type')} messageId={message_id}>"


_sdk_log = logging.getLogger("dingdifyd.dingtalk.sdk")
_sdk_log.addFilter(_SdkLogFilter())
# websockets dumps every frame at DEBUG, and robot message frames carry sessionWebhook URLs (credentials)
# and message text: its logger for our connections stays at INFO whatever the daemon's level.
_websocket_log = logging.getLogger("dingdifyd.dingtalk.websocket")
_websocket_log.setLevel(logging.INFO)


# --- payload → IncomingMessage (pure) ---------------------------------------------------------------------


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return _valid_unicode(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates (`"\\ud800"`), which no UTF-8 encoder accepts further on (card, Dify,
    store keys): each becomes U+FFFD here, once, instead of an error later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _text_of(msg_type: str, data: Mapping[str, Any], content: Mapping[str, Any]) -> str:
    if msg_type == "text":
        text = data.get("text")
        return _as_str(text.get("content")).strip() if isinstance(text, Mapping) else ""
    if msg_type == "richText":
        items = content.get("richText")
        if not isinstance(items, list):
            return ""
        parts = (_as_str(item.get("text")).strip() for item in items if isinstance(item, Mapping))
        return "\n".join(part for part in parts if part)
    if msg_type == "audio":
        return _as_str(content.get("recognition")).strip()
    return ""


def parse_incoming(data: Any, *, default_robot_code: str = "") -> IncomingMessage | None:
    """The robot message in a callback's `data`, or None when it has no msgId to answer or de-duplicate by.

    Never raises: DingTalk sends shapes the SDK's parser chokes on, e.g. no `text` at all once the org's
    message quota is exhausted (then `content` keeps the `errorMessage` for the bridge to see).
    """
    if not isinstance(data, Mapping):
        return None
    msg_id = _as_str(data.get("msgId"))
    if not msg_id:
        return None
    msg_type = _as_str(data.get("msgtype")) or "unknown"
    raw_content = data.get("content")
    content: dict[str, Any] = dict(raw_content) if isinstance(raw_content, Mapping) else {}
    if "errorMessage" in data and "errorMessage" not in content:
        content["errorMessage"] = data["errorMessage"]
    conversation_type = _as_str(data.get("conversationType"))
    if conversation_type not in (SINGLE_CHAT, GROUP_CHAT):
        # fail closed: as a 1:1 chat it would escape allow_groups / deny_groups
        log.warning("message %s: conversationType %.20r is neither 1 (1:1) nor 2 (group); handled as a group",
                    msg_id, conversation_type)  # fmt: skip
        conversation_type = GROUP_CHAT
    return IncomingMessage(
        robot_code=_as_str(data.get("robotCode")) or default_robot_code,
        msg_id=msg_id,
        msg_type=msg_type,
        text=_text_of(msg_type, data, content),
        conversation_id=_as_str(data.get("conversationId")),
        conversation_type=conversation_type,
        sender_id=_as_str(data.get("senderId")),
        sender_staff_id=_as_str(data.get("senderStaffId")),
        sender_nick=_as_str(data.get("senderNick")),
        sender_corp_id=_as_str(data.get("senderCorpId")),
        conversation_title=_as_str(data.get("conversationTitle")),
        session_webhook=_as_str(data.get("sessionWebhook")),
        session_webhook_expires_ms=_as_int(data.get("sessionWebhookExpiredTime")),
        created_at_ms=_as_int(data.get("createAt")),
        content=content,
    )


def _frame_problem(frame: Any) -> str | None:
    """Why the SDK would fail on this frame (and send no ACK), or None when it can route it."""
    if not isinstance(frame, dict):
        return "not a JSON object"
    headers = frame.get("headers")
    if not isinstance(headers, dict):
        return "no headers object"
    for key in ("time", "eventBornTime"):
        if key in headers:
            try:
                int(headers[key])  # what the SDK's Headers.from_dict does
            except (TypeError, ValueError):
                return f"non-numeric headers.{key}"
    data = frame.get("data")
    if data is None or data == "":
        return None
    if not isinstance(data, str):
        return "data is not a JSON string"
    try:
        json.loads(data)
    except ValueError:
        return "data is not valid JSON"
    return None


# --- the SDK glue -----------------------------------------------------------------------------------------


_NO_ACK = -1  # what `process` returns for a frame that must not be ACKed


class _ChatbotCallbackHandler(dingtalk_stream.CallbackHandler):
    """Hands each robot message to the bridge and returns at once: the SDK ACKs only after `process()`, and
    DingTalk redelivers what is not ACKed within about 60 s. `on_message` returns False for a message the
    bot could not take (its store cannot claim it): it is not ACKed, and DingTalk delivers it again."""

    def __init__(self, on_message: Callable[[IncomingMessage], bool | None], robot_code: str):
        super().__init__()
        self.logger = _sdk_log
        self._on_message = on_message
        self._robot_code = robot_code

    async def process(self, callback: dingtalk_stream.CallbackMessage) -> tuple[int, str]:
        message_id = callback.headers.message_id
        try:
            message = parse_incoming(callback.data, default_robot_code=self._robot_code)
            if message is None:
                log.warning("robot message without msgId ignored (frame %s)", message_id)
            else:
                log.debug("robot message %s (frame %s, %s)", message.msg_id, message_id, message.msg_type)
                if self._on_message(message) is False:
                    return _NO_ACK, ""
        except Exception:
            # Raising here would mean no ACK and a redelivery of the same failure a minute later.
            log.exception("handling robot message of frame %s failed", message_id)
        return dingtalk_stream.AckMessage.STATUS_OK, "OK"

    async def raw_process(self, callback_message: dingtalk_stream.CallbackMessage) -> Any:
        ack = await super().raw_process(callback_message)
        return None if ack.code == _NO_ACK else ack  # the SDK sends no frame for None


class StreamConnection(dingtalk_stream.DingTalkStreamClient):
    """One app's Stream connection, kept up until cancelled or closed. `on_message` is called synchronously
    from the frame's task, must only schedule work, and returns False for a frame not to be ACKed."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: Secret,
        api_base: str,
        session: aiohttp.ClientSession,
        on_message: Callable[[IncomingMessage], bool | None],
        on_state: Callable[[str], None] = lambda state: None,
        on_failure: Callable[[str], None] = lambda reason: None,
        open_timeout: float = 10.0,
        reconnect_min_delay: float = 1.0,
        reconnect_max_delay: float = 60.0,
        stable_after: float = 30.0,
    ):
        # The SDK gets the Secret object, not its value: we never let the SDK open connections or fetch
        # tokens, and if some SDK helper ever tried, encoding a Secret fails instead of leaking it.
        super().__init__(dingtalk_stream.Credential(client_id, client_secret), logger=_sdk_log)
        self.client_id = client_id
        self._secret = client_secret
        self._open_url = api_base.rstrip("/") + "/v1.0/gateway/connections/open"
        self._session = session
        self._on_state = on_state
        self._on_failure = on_failure  # why a connection attempt failed (no secret, no ticket in it)
        self._open_timeout = open_timeout
        self._backoff = Backoff(reconnect_min_delay, reconnect_max_delay)
        self._stable_after = stable_after
        self._frame_tasks: set[asyncio.Task[None]] = set()
        self._malformed_seen = RecentIds(1000)  # malformed frames already logged
        self._disconnect_requested = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._run_task: asyncio.Task[Any] | None = None
        self.register_callback_handler(
            dingtalk_stream.ChatbotMessage.TOPIC, _ChatbotCallbackHandler(on_message, client_id)
        )

    # --- public ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect and serve until cancelled or closed. Raises DingTalkAuthError on refused credentials."""
        self._run_task = asyncio.current_task()
        try:
            await self.start()
        finally:
            await self._cancel_frame_tasks()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        websocket = self.websocket
        if websocket is not None:
            await websocket.close()
        task = self._run_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            done, _ = await asyncio.wait({task}, timeout=self._open_timeout + 1.0)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        await self._cancel_frame_tasks()

    async def check_gateway(self) -> None:
        """Ask the gateway for a connection ticket and use none of it (`dingdifyd doctor`). Raises like `run`."""
        await self._open_ticket()

    # --- SDK overrides --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.pre_start()
        while not self._stopping:
            reconnect_now = False
            try:
                endpoint, ticket = await self._open_ticket()
                if self._stopping:
                    break
                connected_at = time.monotonic()
                reconnect_now = await self._serve(endpoint, ticket)
                if time.monotonic() - connected_at >= self._stable_after:
                    self._backoff.reset()
            except DingTalkAuthError:
                raise
            except (DingTalkError, OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
                log.warning("DingTalk Stream connection of %s failed: %s", self.client_id, _describe(exc))
                self._report_failure(_describe(exc))
            except Exception as exc:
                # Whatever went wrong, the robot must come back: log it loudly and retry after a pause.
                log.exception("DingTalk Stream connection of %s failed unexpectedly", self.client_id)
                self._report_failure(f"unexpected {type(exc).__name__}")
            if self._stopping:
                break
            if reconnect_now:
                # DingTalk asked us to move (load balancing): that is not a failure, reconnect at once.
                self._backoff.reset()
                continue
            delay = self._backoff.next_delay()
            log.info("DingTalk Stream of %s reconnects in %.1fs", self.client_id, delay)
            await self._sleep(delay)

    def open_connection(self) -> Any:
        raise NotImplementedError("StreamConnection opens its connections itself (non-blocking)")

    def get_access_token(self) -> Any:
        raise NotImplementedError("use dingdifyd.dingtalk.api.DingTalkApi")

    def upload_to_dingtalk(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("use dingdifyd.dingtalk.api.DingTalkApi")

    # --- internals ------------------------------------------------------------------------------------

    async def _open_ticket(self) -> tuple[str, str]:
        """POST gateway/connections/open, as the SDK does but with a timeout and without its get_host_ip."""
        subscriptions = [{"type": "CALLBACK", "topic": topic} for topic in self.callback_handler_map]
        body = {
            "clientId": self.client_id,
            "clientSecret": self._secret.reveal(),
            "subscriptions": subscriptions,
            "ua": f"dingtalk-sdk-python/v{VERSION_STRING}-union",
            "localIp": "",
        }
        headers = {
            "Accept": "application/json",
            "User-Agent": f"DingTalkStream/1.0 SDK/{VERSION_STRING} Python/{platform.python_version()} "
            "(+https://github.com/open-dingtalk/dingtalk-stream-sdk-python)",
        }
        status, raw = await exchange(
            self._session, "POST", self._open_url, what="gateway open", timeout=self._open_timeout,
            json=body, headers=headers,
        )  # fmt: skip
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        code = str(payload.get("code", "")) if isinstance(payload, dict) else ""
        if status in (400, 401, 403):
            log.error(
                "DingTalk refused the credentials of app %s when opening the Stream connection (HTTP %s %s)",
                self.client_id, status, code,
            )
            raise DingTalkAuthError(
                f"DingTalk refused the Stream credentials of app {self.client_id}",
                status=status, code=code or None,
            )
        if status != 200:
            raise DingTalkError(
                f"gateway open failed: HTTP {status} {code}".rstrip(), status=status, code=code or None
            )
        endpoint = payload.get("endpoint") if isinstance(payload, dict) else None
        ticket = payload.get("ticket") if isinstance(payload, dict) else None
        if not isinstance(endpoint, str) or not endpoint or not isinstance(ticket, str) or not ticket:
            raise DingTalkError("gateway open answered without endpoint and ticket", status=status)
        return endpoint, ticket

    async def _serve(self, endpoint: str, ticket: str) -> bool:
        """One WebSocket session. Returns True when DingTalk asked for a reconnect (SYSTEM disconnect)."""
        separator = "&" if "?" in endpoint else "?"
        uri = f"{endpoint}{separator}ticket={quote_plus(ticket)}"
        self._disconnect_requested = False
        async with websockets.connect(
            uri, open_timeout=self._open_timeout, close_timeout=2, logger=_websocket_log
        ) as websocket:
            self.websocket = websocket
            log.info("DingTalk Stream of %s connected", self.client_id)
            self._notify_state(STATE_CONNECTED)
            try:
                if self._stopping:
                    return False
                async for raw in websocket:
                    self._dispatch(raw)
            finally:
                self._notify_state(STATE_DISCONNECTED)
        log.info("DingTalk Stream of %s closed (code %s)", self.client_id, websocket.close_code)
        return self._disconnect_requested

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            log.warning("DingTalk Stream frame dropped: not JSON (%d bytes)", len(raw))
            return
        problem = _frame_problem(frame)
        if problem is not None:
            self._drop_malformed(frame, problem)
            return
        headers = frame["headers"]
        log.debug("frame %s %s %s", frame.get("type"), headers.get("topic"), headers.get("messageId"))
        if frame.get("type") == dingtalk_stream.SystemMessage.TYPE and (
            headers.get("topic") == dingtalk_stream.SystemMessage.TOPIC_DISCONNECT
        ):
            self._disconnect_requested = True
        # The SDK's routing builds and sends the ACK; each frame in its own task, as the SDK does.
        task = asyncio.get_running_loop().create_task(self.background_task(frame))
        self._frame_tasks.add(task)
        task.add_done_callback(self._frame_tasks.discard)

    def _drop_malformed(self, frame: Any, problem: str) -> None:
        """A frame the SDK cannot route is ACKed all the same when it names itself: unACKed, DingTalk would
        deliver it again and again, each time to the same end. Logged once per frame."""
        headers = frame.get("headers") if isinstance(frame, dict) else None
        message_id = headers.get("messageId") if isinstance(headers, dict) else None
        if not isinstance(message_id, str) or not message_id:
            log.warning("DingTalk Stream frame dropped: %s (no messageId to ACK it by)", problem)
            return
        if self._malformed_seen.add(message_id):
            log.warning("DingTalk Stream frame %s dropped: %s; ACKed so that it is not redelivered",
                        message_id, problem)  # fmt: skip
        else:
            log.debug("DingTalk Stream frame %s dropped again: %s", message_id, problem)
        ack = {
            "code": dingtalk_stream.AckMessage.STATUS_OK,
            "headers": {"contentType": "application/json", "messageId": message_id},
            "message": "malformed frame dropped",
            "data": json.dumps({"response": None}),
        }
        websocket = self.websocket
        if websocket is not None:
            task = asyncio.get_running_loop().create_task(self._send_quietly(websocket, json.dumps(ack)))
            self._frame_tasks.add(task)
            task.add_done_callback(self._frame_tasks.discard)

    @staticmethod
    async def _send_quietly(websocket: Any, text: str) -> None:
        with contextlib.suppress(websockets.exceptions.WebSocketException, OSError):
            await websocket.send(text)

    def _report_failure(self, reason: str) -> None:
        try:
            self._on_failure(f"DingTalk Stream: {reason}")
        except Exception:
            log.exception("on_failure failed")

    def _notify_state(self, state: str) -> None:
        try:
            self._on_state(state)
        except Exception:
            log.exception("on_state(%s) failed", state)

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _cancel_frame_tasks(self) -> None:
        tasks = list(self._frame_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DingTalkError):
        return str(exc)
    if isinstance(exc, websockets.exceptions.ConnectionClosed):
        return f"connection lost ({type(exc).__name__}, code {exc.rcvd.code if exc.rcvd else 'none'})"
    # Handshake errors of websockets may quote the URI, whose query is the ticket: never use their text.
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"{type(exc).__name__} (HTTP {status})" if status else type(exc).__name__
