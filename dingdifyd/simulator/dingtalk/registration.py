"""DingTalk's QR-code app registration ("一键创建钉钉应用"), as the fake DingTalk serves it on its oapi side.

The flow as recorded from DingTalk's document and the connectors that use it (docs/dingtalk.md#qr-app-registration):
`POST /app/registration/init {"source"?}` -> a one-time `nonce` (300 s); `POST /app/registration/begin
{"nonce"}` -> `device_code`, `user_code` (XXXX-XXXX-XXXX), `verification_uri(_complete)` (the QR's content),
`expires_in` 7200, `interval`; `POST /app/registration/poll {"device_code"}` -> `status` WAITING | SUCCESS (with
`client_id` and `client_secret`, once) | FAIL (`fail_reason`) | EXPIRED. Every answer has `errcode`/`errmsg`;
errcode != 0 for a bad request (DingTalk's real codes for these are unknown: the fake's are its own).

A test "scans" with `approve(user_code)` (the new app is registered with the fake DingTalk, so its
credentials then work for tokens and the Stream gateway), refuses with `deny(user_code, reason)`, or scripts
the statuses a session's polls get with `script(user_code, [...])`. Polls are recorded with their times.
"""

from __future__ import annotations

import secrets
import string
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

VERIFICATION_URI = "https://open-dev.dingtalk.com/openapp/registration/openClaw"
NONCE_TTL = 300.0
BAD_REQUEST = 400001  # the fake's errcodes (DingTalk's own for these cases are not documented)
UNKNOWN_NONCE = 400002
UNKNOWN_DEVICE = 400003


@dataclass
class RegistrationSession:
    device_code: str
    user_code: str
    source: str
    created: float
    expires_in: int
    status: str = "WAITING"
    fail_reason: str = ""
    client_id: str = ""
    client_secret: str = ""
    delivered: bool = False  # SUCCESS hands the secret out once; later polls see EXPIRED
    scripted: deque[dict[str, Any]] = field(default_factory=deque)
    polls: list[float] = field(default_factory=list)


class FakeRegistration:
    """`register_app(client_id, client_secret)` makes an approved app known to the fake DingTalk."""

    def __init__(self, register_app: Callable[[str, str], Any], *, interval: int = 2, expires_in: int = 7200):
        self._register_app = register_app
        self.interval = interval  # 5 in DingTalk's document, 2 seen live
        self.expires_in = expires_in
        self.sessions: dict[str, RegistrationSession] = {}  # by device code
        self.init_requests: list[dict[str, Any]] = []
        self._nonces: dict[str, float] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/app/registration/init", self._init),
            web.post("/app/registration/begin", self._begin),
            web.post("/app/registration/poll", self._poll),
        ]

    # --- the test's side: scanning the QR code ---------------------------------------------------------------

    def session(self, user_code: str) -> RegistrationSession:
        for session in self.sessions.values():
            if session.user_code == user_code:
                return session
        raise KeyError(user_code)

    def approve(self, user_code: str, client_id: str | None = None) -> tuple[str, str]:
        """The admin scanned and agreed: DingTalk created an app in their organisation."""
        session = self.session(user_code)
        session.client_id = client_id or f"ding{secrets.token_hex(8)}"
        session.client_secret = secrets.token_urlsafe(32)
        session.status = "SUCCESS"
        self._register_app(session.client_id, session.client_secret)
        return session.client_id, session.client_secret

    def deny(self, user_code: str, reason: str = "用户拒绝授权") -> None:
        session = self.session(user_code)
        session.status, session.fail_reason = "FAIL", reason

    def expire(self, user_code: str) -> None:
        self.session(user_code).status = "EXPIRED"

    def script(self, user_code: str, answers: list[dict[str, Any] | str]) -> None:
        """What the next polls of this session get, in order (a status, or a whole answer); then the real state."""
        self.session(user_code).scripted.extend({"status": a} if isinstance(a, str) else a for a in answers)

    # --- the API --------------------------------------------------------------------------------------------

    async def _init(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if body is None:
            return _error(BAD_REQUEST, "invalid json body")
        self.init_requests.append(body)
        nonce = "nr_" + secrets.token_hex(16)
        self._nonces[nonce] = time.monotonic() + NONCE_TTL
        return _ok(nonce=nonce, expires_in=int(NONCE_TTL))

    async def _begin(self, request: web.Request) -> web.Response:
        body = await _body(request)
        nonce = body.get("nonce") if body else None
        expires = self._nonces.pop(str(nonce), None)  # one use only
        if expires is None or time.monotonic() > expires:
            return _error(UNKNOWN_NONCE, "nonce is invalid or expired")
        user_code = "-".join("".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(4))
                             for _ in range(3))  # fmt: skip
        source = str((self.init_requests[-1] if self.init_requests else {}).get("source") or "")
        session = RegistrationSession(
            device_code=secrets.token_urlsafe(32), user_code=user_code, source=source, created=time.monotonic(),
            expires_in=self.expires_in,
        )  # fmt: skip
        self.sessions[session.device_code] = session
        complete = f"{VERIFICATION_URI}?user_code={user_code}" + (f"&source={source}" if source else "")
        return _ok(
            device_code=session.device_code, user_code=user_code, verification_uri=VERIFICATION_URI,
            verification_uri_complete=complete, expires_in=session.expires_in, interval=self.interval,
        )  # fmt: skip

    async def _poll(self, request: web.Request) -> web.Response:
        body = await _body(request)
        session = self.sessions.get(str((body or {}).get("device_code")))
        if session is None:
            return _error(UNKNOWN_DEVICE, "device_code is invalid")
        session.polls.append(time.monotonic())
        if session.scripted:
            return _ok(**session.scripted.popleft())
        if time.monotonic() - session.created > session.expires_in or session.delivered:
            return _ok(status="EXPIRED")
        if session.status == "SUCCESS":
            session.delivered = True
            return _ok(status="SUCCESS", client_id=session.client_id, client_secret=session.client_secret)
        if session.status == "FAIL":
            return _ok(status="FAIL", fail_reason=session.fail_reason)
        return _ok(status=session.status)


async def _body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _ok(**fields: Any) -> web.Response:
    return web.json_response({"errcode": 0, "errmsg": "ok", **fields})


def _error(code: int, message: str) -> web.Response:
    return web.json_response({"errcode": code, "errmsg": message})
