"""DingTalk OpenAPI client: access token, AI cards, session-webhook replies, message files and media.

Every HTTP exchange goes through `_send`, which turns transport failures into the project's errors, and every
OpenAPI call through `_request`, which adds the token, reports the call to `on_call` (the accounting of the
monthly quota) and retries what DingTalk says is worth retrying (QPS refusals, 429, 5xx, one 401 with a fresh
token). Card calls are paced by the caller: the app's card-call scheduler (pacing/scheduler.py) gives them
turns and passes `attempts=1` so that it does the retrying itself, with the newest text. Nothing here logs or
raises text containing the client secret, a token or a session-webhook URL (its `session=` is a credential).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from dingdifyd.config import Secret
from dingdifyd.errors import (
    CardAlreadyExists,
    DingTalkAuthError,
    DingTalkError,
    DingTalkPermissionDenied,
    DingTalkRateLimited,
    DingTalkUnavailable,
)
from dingdifyd.models import GROUP_CHAT
from dingdifyd.pacing.backoff import Backoff

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-acs-dingtalk-access-token"
QPS_LIMIT_CODE_PREFIX = "Forbidden.AccessDenied.QpsLimit"
PERMISSION_DENIED_CODE = "Forbidden.AccessDenied.AccessTokenPermissionDenied"
CARD_ALREADY_EXISTS = "param.cardAlreadyExist"
# Refresh this long before DingTalk's expiry, like the SDK, so a token never dies in flight.
TOKEN_REFRESH_MARGIN = 300.0
# oapi (legacy API) answers 200 with these errcodes for a bad or expired access_token.
_OAPI_TOKEN_ERRCODES = frozenset({40014, 42001})

JsonDict = dict[str, Any]


def _parse_json(raw: bytes) -> JsonDict:
    """DingTalk error bodies are JSON objects, but an IP ban answers an HTML page: never fail on the body."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"result": value}


def _error_code(payload: Mapping[str, Any]) -> str:
    code = payload.get("code")
    if code is None:
        code = payload.get("errcode")
    return "" if code is None else str(code)


def _required_scopes(payload: Mapping[str, Any]) -> tuple[str, ...]:
    detail = payload.get("accessdenieddetail")
    scopes = detail.get("requiredScopes") if isinstance(detail, dict) else None
    return tuple(str(s) for s in scopes) if isinstance(scopes, list) else ()


def _error_for(api: str, status: int, payload: Mapping[str, Any]) -> DingTalkError:
    """The error for a non-2xx answer; its `retryable` says whether the call is worth another try."""
    code = _error_code(payload)
    message = str(payload.get("message") or payload.get("errmsg") or "")[:200]
    text = f"DingTalk {api} failed: HTTP {status}"
    if code:
        text += f" {code}"
    if message:
        text += f": {message}"
    if code == PERMISSION_DENIED_CODE:
        scopes = _required_scopes(payload)
        if scopes:
            text += f" (required: {', '.join(scopes)})"
        return DingTalkPermissionDenied(text, status=status, code=code, required_scopes=scopes)
    if status == 429 or (status == 403 and code.startswith(QPS_LIMIT_CODE_PREFIX)):
        return DingTalkRateLimited(text, status=status, code=code or None)
    if status >= 500:
        return DingTalkUnavailable(text, status=status, code=code or None)
    if code == CARD_ALREADY_EXISTS:
        return CardAlreadyExists(text, status=status, code=code)
    return DingTalkError(text, status=status, code=code or None)


def describe_transport_error(exc: BaseException) -> str:
    # aiohttp's own messages may quote the URL and its query (session=, access_token=): never use them.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}"
    return type(exc).__name__


async def exchange(
    session: aiohttp.ClientSession, method: str, url: str, *, what: str, timeout: float, **request: Any
) -> tuple[int, bytes]:
    """One HTTP exchange with DingTalk (the OpenAPI, the Stream gateway, the app registration): its status and
    body. No redirect is followed (a body may hold the app's secret). A failure to get an answer is
    DingTalkUnavailable, `what` saying of which call; its text never quotes the URL."""
    try:
        async with session.request(
            method, url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False, **request
        ) as response:
            return response.status, await response.read()
    except TimeoutError:
        raise DingTalkUnavailable(f"{what}: no answer within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise DingTalkUnavailable(f"{what}: {describe_transport_error(exc)}") from None


class DingTalkApi:
    """One DingTalk app's OpenAPI access over a shared aiohttp session (not owned: the caller closes it)."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: Secret,
        session: aiohttp.ClientSession,
        api_base: str = "https://api.dingtalk.com",
        oapi_base: str = "https://oapi.dingtalk.com",
        timeout: float = 10.0,
        on_call: Callable[[str], None] | None = None,
        on_result: Callable[[str, int | None, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 10.0,
        max_attempts: int = 5,
        rng: Callable[[], float] = random.random,
    ):
        self.client_id = client_id
        self._secret = client_secret
        self._session = session
        self._api_base = api_base.rstrip("/")
        self._oapi_base = oapi_base.rstrip("/")
        self._timeout = timeout
        self._clock = clock
        self._on_call = on_call
        self._on_result = on_result  # (api, HTTP status or None when unanswered, error code): the metrics
        self._retry_base_delay = retry_base_delay
        self._retry_max_delay = retry_max_delay
        self._max_attempts = max(1, max_attempts)
        self._rng = rng
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._token_fetch: asyncio.Task[str] | None = None

    # --- access token ---------------------------------------------------------------------------------

    async def access_token(self) -> str:
        """The cached token, fetched once for all concurrent callers when missing or close to expiry."""
        if self._token is not None and self._clock() < self._token_refresh_at:
            return self._token
        if self._token_fetch is None:
            self._token_fetch = asyncio.get_running_loop().create_task(self._fetch_token())
            self._token_fetch.add_done_callback(self._token_fetch_done)
        # shield: one caller being cancelled must not cancel the fetch the others wait for.
        return await asyncio.shield(self._token_fetch)

    def _token_fetch_done(self, task: asyncio.Task[str]) -> None:
        if self._token_fetch is task:
            self._token_fetch = None
        if not task.cancelled():
            task.exception()  # marks it retrieved even if every waiter was cancelled

    async def _fetch_token(self) -> str:
        body = {"appKey": self.client_id, "appSecret": self._secret.reveal()}
        try:
            payload = await self._request(
                "POST", f"{self._api_base}/v1.0/oauth2/accessToken", api="oauth2.accessToken", body=body,
                with_token=False,
            )
        except DingTalkRateLimited:
            raise
        except DingTalkError as exc:
            if exc.status in (400, 401, 403):
                raise DingTalkAuthError(
                    f"DingTalk refused the credentials of app {self.client_id} ({exc.code or exc.status})",
                    status=exc.status, code=exc.code,
                ) from None
            raise
        token = payload.get("accessToken")
        expire_in = payload.get("expireIn")
        if not (isinstance(token, str) and token and isinstance(expire_in, int | float) and expire_in > 0):
            raise DingTalkError("DingTalk oauth2.accessToken answered without a usable token")
        now = self._clock()
        # Short test lifetimes would leave nothing after the 5-minute margin: refresh at half-life then.
        self._token_refresh_at = now + max(expire_in - TOKEN_REFRESH_MARGIN, expire_in / 2)
        self._token = token
        log.debug("DingTalk access token for %s fetched, valid %ss", self.client_id, expire_in)
        return token

    def _drop_token(self, stale: str) -> None:
        # Another task may already have replaced it; only forget the token that was refused.
        if self._token == stale:
            self._token = None

    # --- the choke points -----------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        api: str,
        body: Any = None,
        form: aiohttp.FormData | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        status, raw = await exchange(
            self._session, method, url, what=f"DingTalk {api}", timeout=self._timeout,
            json=body, data=form, params=params, headers=headers,
        )  # fmt: skip
        log.debug("DingTalk %s: HTTP %s", api, status)
        return status, raw

    async def _request(
        self,
        method: str,
        url: str,
        *,
        api: str,
        body: Any = None,
        with_token: bool = True,
        attempts: int | None = None,
        ok_on_retry: frozenset[str] = frozenset(),
    ) -> JsonDict:
        """One logical call, with up to `attempts` tries (default: the client's). `ok_on_retry`: error codes
        that mean an earlier attempt of this same call did succeed (e.g. the card exists because the first,
        5xx-answered try created it)."""
        backoff = Backoff(self._retry_base_delay, self._retry_max_delay, rand=self._rng)
        max_attempts = max(1, attempts) if attempts is not None else self._max_attempts
        token_renewed = False
        while True:
            headers = {"Accept": "application/json"}
            token = ""
            if with_token:
                token = await self.access_token()
                headers[TOKEN_HEADER] = token
            try:
                status, raw = await self._send(method, url, api=api, body=body, headers=headers)
            except DingTalkUnavailable:
                self._observe(api, None, "")
                raise
            if with_token:
                self._count(api)
            payload = _parse_json(raw)
            self._observe(api, status, _error_code(payload))
            if 200 <= status < 300:
                return payload
            code = _error_code(payload)
            if status == 401 and with_token and not token_renewed:
                token_renewed = True
                self._drop_token(token)
                log.info("DingTalk %s: token refused (401), fetching a new one", api)
                continue
            if backoff.attempts > 0 and code in ok_on_retry:
                return payload
            error = _error_for(api, status, payload)
            if error.retryable and backoff.attempts + 1 < max_attempts:
                delay = backoff.next_delay()
                log.warning("DingTalk %s: HTTP %s %s, retry %d in %.2fs",
                            api, status, code, backoff.attempts, delay)
                await asyncio.sleep(delay)
                continue
            raise error

    def _count(self, api: str) -> None:
        """Every OpenAPI call that reached DingTalk counts against the org's monthly quota (token calls do not)."""
        if self._on_call is not None:
            try:
                self._on_call(api)
            except Exception:  # the accounting must never break a call
                log.exception("counting a DingTalk call failed")

    def _observe(self, api: str, status: int | None, code: str) -> None:
        if self._on_result is not None:
            try:
                self._on_result(api, status, code)
            except Exception:  # like the accounting: never at a call's expense
                log.exception("observing a DingTalk call failed")

    # --- cards ----------------------------------------------------------------------------------------

    async def create_and_deliver_card(
        self,
        *,
        out_track_id: str,
        template_id: str,
        card_data: dict[str, str],
        conversation_type: str,
        conversation_id: str,
        sender_staff_id: str,
        robot_code: str,
        attempts: int | None = None,
    ) -> None:
        body: JsonDict = {
            "cardTemplateId": template_id,
            "outTrackId": out_track_id,
            "cardData": {"cardParamMap": dict(card_data)},
            "callbackType": "STREAM",
        }
        if conversation_type == GROUP_CHAT:
            body["openSpaceId"] = f"dtv1.card//IM_GROUP.{conversation_id}"
            body["imGroupOpenSpaceModel"] = {"supportForward": True}
            body["imGroupOpenDeliverModel"] = {"robotCode": robot_code}
        else:
            body["openSpaceId"] = f"dtv1.card//IM_ROBOT.{sender_staff_id}"
            body["imRobotOpenSpaceModel"] = {"supportForward": True}
            body["imRobotOpenDeliverModel"] = {"spaceType": "IM_ROBOT"}
        payload = await self._request(
            "POST", f"{self._api_base}/v1.0/card/instances/createAndDeliver", api="card.createAndDeliver",
            body=body, attempts=attempts, ok_on_retry=frozenset({CARD_ALREADY_EXISTS}),
        )
        result = payload.get("result")
        deliveries = result.get("deliverResults") if isinstance(result, dict) else None
        for delivery in deliveries or ():
            if isinstance(delivery, dict) and delivery.get("success") is False:
                raise DingTalkError(
                    f"DingTalk card.createAndDeliver: not delivered to {delivery.get('spaceType')}: "
                    f"{str(delivery.get('errorMsg', ''))[:200]}",
                    status=200, code="deliverFailed",
                )

    async def stream_card(
        self,
        *,
        out_track_id: str,
        key: str,
        content: str,
        finalize: bool = False,
        error: bool = False,
        attempts: int | None = None,
    ) -> None:
        """Replace the streamed variable `key` with the full `content` (isFull: markdown keys need it)."""
        body = {
            "outTrackId": out_track_id,
            "guid": str(uuid.uuid4()),
            "key": key,
            "content": content,
            "isFull": True,
            "isFinalize": finalize,
            "isError": error,
        }
        await self._request("PUT", f"{self._api_base}/v1.0/card/streaming", api="card.streaming", body=body,
                            attempts=attempts)

    async def update_card_data(
        self, *, out_track_id: str, card_data: dict[str, str], attempts: int | None = None
    ) -> None:
        """Set the given card variables and keep the others (without updateCardDataByKey: map replaced)."""
        body = {
            "outTrackId": out_track_id,
            "cardData": {"cardParamMap": dict(card_data)},
            "cardUpdateOptions": {"updateCardDataByKey": True},
        }
        await self._request("PUT", f"{self._api_base}/v1.0/card/instances", api="card.update", body=body,
                            attempts=attempts)

    # --- plain replies --------------------------------------------------------------------------------

    async def reply_via_webhook(
        self, webhook_url: str, *, title: str, markdown: str, at_user_ids: Iterable[str] = ()
    ) -> None:
        """Markdown reply through the message's sessionWebhook (no token; valid until its expiry time)."""
        body = {
            "msgtype": "markdown",
            "markdown": {"title": title, "text": markdown},
            "at": {"atUserIds": list(at_user_ids)},
        }
        payload = await self._request("POST", webhook_url, api="webhook.reply", body=body, with_token=False)
        errcode = payload.get("errcode", 0)
        if errcode not in (0, "0"):
            raise DingTalkError(
                f"DingTalk webhook.reply refused: errcode {errcode}: {str(payload.get('errmsg', ''))[:200]}",
                status=200, code=str(errcode),
            )

    async def send_robot_markdown(
        self,
        *,
        robot_code: str,
        conversation_type: str,
        conversation_id: str,
        staff_id: str,
        title: str,
        markdown: str,
    ) -> None:
        """Markdown through the robot send API: what is left when a message's sessionWebhook has expired."""
        await self.send_robot_message(
            robot_code=robot_code, conversation_type=conversation_type, conversation_id=conversation_id,
            staff_id=staff_id, msg_key="sampleMarkdown", msg_param={"title": title, "text": markdown},
        )  # fmt: skip

    # --- files ----------------------------------------------------------------------------------------

    async def download_message_file(self, *, download_code: str, robot_code: str) -> bytes:
        """The bytes of a picture, file, audio or video a person sent (content.downloadCode)."""
        payload = await self._request(
            "POST", f"{self._api_base}/v1.0/robot/messageFiles/download", api="robot.messageFiles.download",
            body={"downloadCode": download_code, "robotCode": robot_code},
        )
        url = payload.get("downloadUrl")
        if not isinstance(url, str) or not url:
            raise DingTalkError("DingTalk robot.messageFiles.download answered without a downloadUrl")
        status, raw = await self._send("GET", url, api="file.download")
        if status != 200:
            raise DingTalkError(f"DingTalk file.download failed: HTTP {status}", status=status)
        return raw

    async def upload_media(
        self, data: bytes, *, filename: str, content_type: str, media_type: str = "image"
    ) -> str:
        """Upload to the legacy media store; returns the media id (`@lA...`) usable in markdown `![](@id)`."""
        for renewed in (False, True):
            token = await self.access_token()
            form = aiohttp.FormData()
            form.add_field("type", media_type)
            form.add_field("media", data, filename=filename, content_type=content_type)
            status, raw = await self._send(
                "POST", f"{self._oapi_base}/media/upload", api="media.upload", form=form,
                params={"access_token": token, "type": media_type},
            )
            self._count("media.upload")
            payload = _parse_json(raw)
            errcode = payload.get("errcode", 0)
            if (status == 401 or errcode in _OAPI_TOKEN_ERRCODES) and not renewed:
                self._drop_token(token)
                continue
            if status != 200:
                raise _error_for("media.upload", status, payload)
            if errcode not in (0, "0"):
                raise DingTalkError(
                    f"DingTalk media.upload refused: errcode {errcode}: "
                    f"{str(payload.get('errmsg', ''))[:200]}",
                    status=200, code=str(errcode),
                )
            media_id = payload.get("media_id")
            if not isinstance(media_id, str) or not media_id:
                raise DingTalkError("DingTalk media.upload answered without a media_id")
            return media_id
        raise DingTalkError("DingTalk media.upload: the access token was refused twice", status=401)

    # --- robot messages (files and images after a card) -----------------------------------------------

    async def send_robot_message(
        self,
        *,
        robot_code: str,
        conversation_type: str,
        conversation_id: str,
        staff_id: str,
        msg_key: str,
        msg_param: Mapping[str, Any],
    ) -> None:
        """Any robot message template (`sampleImageMsg`, `sampleFile`, ...) to the chat a message came from:
        a group by its openConversationId, a 1:1 chat by the person's staff id (docs/dingtalk.md#robot-send-api)."""
        param = json.dumps(dict(msg_param), ensure_ascii=False)
        if conversation_type == GROUP_CHAT:
            body: JsonDict = {"robotCode": robot_code, "openConversationId": conversation_id,
                              "msgKey": msg_key, "msgParam": param}
            await self._request("POST", f"{self._api_base}/v1.0/robot/groupMessages/send",
                                api="robot.groupMessages.send", body=body)
            return
        if not staff_id:
            raise DingTalkError("DingTalk robot.oToMessages.batchSend: the person has no staff id to send to")
        body = {"robotCode": robot_code, "userIds": [staff_id], "msgKey": msg_key, "msgParam": param}
        payload = await self._request("POST", f"{self._api_base}/v1.0/robot/oToMessages/batchSend",
                                      api="robot.oToMessages.batchSend", body=body)
        for field in ("invalidStaffIdList", "flowControlledStaffIdList", "filteredStaffIdList"):
            refused = payload.get(field)
            if isinstance(refused, list) and staff_id in refused:
                raise DingTalkError(f"DingTalk robot.oToMessages.batchSend: not sent ({field})", status=200,
                                    code=field)
