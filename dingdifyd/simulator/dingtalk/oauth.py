"""The access token (`POST /v1.0/oauth2/accessToken`) and the gate every OpenAPI call passes: token check, call
counting, injected failures, permissions, and the per-app-per-API QPS limit (docs/dingtalk.md#access-token,
docs/dingtalk.md#rate-limits)."""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dingdifyd.simulator.dingtalk.core import (
    API_BATCH_SEND,
    API_CARD_CREATE,
    API_CARD_DELIVER,
    API_CARD_STREAMING,
    API_CARD_UPDATE,
    API_CREATE_AND_DELIVER,
    API_FILE_DOWNLOAD,
    API_GROUP_SEND,
    API_TOKEN,
    DingTalkCore,
    FakeApp,
    api_error,
    read_json,
    request_id,
)

TOKEN_HEADER = "x-acs-dingtalk-access-token"
QPS_LIMIT_CODE = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"
PERMISSION_DENIED_CODE = "Forbidden.AccessDenied.AccessTokenPermissionDenied"
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


class OAuthRoutes(DingTalkCore):
    def __init__(self, *, token_expire_in: int = 7200, rate_limit: float | None = 20.0, **options: Any):
        super().__init__(**options)
        self.token_expire_in = token_expire_in
        self.rate_limit = rate_limit  # calls per second per (app, API); None: unlimited
        self.qps_rejections: Counter[str] = Counter()
        self.token_fetches: Counter[str] = Counter()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (client_id, expires_at)
        self._app_token: dict[str, str] = {}
        self._windows: dict[tuple[str, str], deque[float]] = {}

    def _token_routes(self) -> list[web.RouteDef]:
        return [web.post("/v1.0/oauth2/accessToken", self._access_token)]

    def revoke_tokens(self, client_id: str | None = None) -> None:
        """Invalidate issued access tokens: the next OpenAPI calls with them get 401."""
        for token, (owner, _) in list(self._tokens.items()):
            if client_id is None or owner == client_id:
                del self._tokens[token]
                self._app_token.pop(owner, None)

    def deny_scopes(self, client_id: str, *scopes: str) -> None:
        """Take permissions away from an app (e.g. "Card.Streaming.Write"): its calls that need one get
        DingTalk's 403 Forbidden.AccessDenied.AccessTokenPermissionDenied naming the required scope."""
        self.apps[client_id].denied_scopes.update(scopes)

    async def _access_token(self, request: web.Request) -> web.StreamResponse:
        self.calls[API_TOKEN] += 1
        fault = self._take_fault(API_TOKEN)
        if fault is not None:
            return await self._fault_response(fault)
        body = await read_json(request)
        app = self.apps.get(str(body.get("appKey"))) if isinstance(body, dict) else None
        if app is None or body.get("appSecret") != app.client_secret:
            return api_error(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
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
                return api_error(401, "InvalidAuthentication", "不合法的access_token")
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
                return api_error(403, QPS_LIMIT_CODE, "app api qps limit exceeded")
            body = await read_json(request)
            if not isinstance(body, dict):
                return api_error(400, "param.invalid", "body is not a JSON object")
            return await handler(app, body)

        return route

    def _permission_denied(self, app: FakeApp, api: str) -> web.Response | None:
        scope = API_SCOPES.get(api)
        if scope is None or scope not in app.denied_scopes:
            return None
        body = {
            "code": PERMISSION_DENIED_CODE,
            "message": "没有调用该接口的权限，接口权限申请参考：https://open.dingtalk.com/document/orgapp/add-api-permission",
            "requestid": request_id(),
            "accessdenieddetail": {"requiredScopes": [scope]},
        }
        return web.json_response(body, status=403)

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
