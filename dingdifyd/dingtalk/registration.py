"""DingTalk's QR-code app registration: a new robot app, created by an admin scanning a code with DingTalk.

The flow (DingTalk's "一键创建钉钉应用扫码接入流程", as the official OpenClaw connector, LangBot and others use it;
see the fake in simulator/dingtalk/registration.py): `init` gives a one-time nonce, `begin` a device code and the
URL to put in the QR code, and `poll` says WAITING until the admin agreed (SUCCESS, with the new app's client id
and secret, once), refused (FAIL, with a reason) or let it lapse (EXPIRED). No access token: these calls are the
way to get an app in the first place. Nothing here logs or raises text containing the device code or the secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from dingdifyd.config import Secret
from dingdifyd.dingtalk.api import exchange
from dingdifyd.errors import DingTalkError, RegistrationError, RegistrationExpired, RegistrationRefused

log = logging.getLogger(__name__)

DEFAULT_BASE = "https://oapi.dingtalk.com"
MIN_INTERVAL = 2.0  # DingTalk's document says 5, 2 was seen live; faster is never asked for
DEFAULT_INTERVAL = 5.0
WAIT_CAP = 600.0  # an admin at a terminal: ten minutes, not the two hours a device code may live
RETRY_WINDOW = 120.0  # network trouble while polling is waited out this long (as the official connector does)


@dataclass(frozen=True)
class PendingRegistration:
    device_code: str
    user_code: str
    url: str  # what the QR code holds
    expires_in: float
    interval: float


@dataclass(frozen=True)
class NewApp:
    client_id: str
    client_secret: Secret


class AppRegistration:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base: str = DEFAULT_BASE,
        source: str | None = None,
        timeout: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self._session = session
        self._base = base.rstrip("/")
        self._source = source
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep

    async def begin(self) -> PendingRegistration:
        init = await self._call("init", {"source": self._source} if self._source else {})
        nonce = init.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise RegistrationError("DingTalk's registration answered without a nonce")
        begun = await self._call("begin", {"nonce": nonce})
        device_code, url = begun.get("device_code"), begun.get("verification_uri_complete")
        if not isinstance(device_code, str) or not isinstance(url, str) or not device_code or not url:
            raise RegistrationError("DingTalk's registration answered without a device code or a URL")
        return PendingRegistration(
            device_code=device_code, user_code=str(begun.get("user_code") or ""), url=url,
            expires_in=_number(begun.get("expires_in"), 7200.0),
            interval=max(MIN_INTERVAL, _number(begun.get("interval"), DEFAULT_INTERVAL)),
        )  # fmt: skip

    async def wait(self, pending: PendingRegistration, *, cap: float = WAIT_CAP) -> NewApp:
        """Poll until the admin has scanned and agreed; raises RegistrationRefused / RegistrationExpired /
        RegistrationError / DingTalkUnavailable."""
        deadline = self._clock() + min(pending.expires_in, cap)
        trouble_since: float | None = None
        while True:
            await self._sleep(pending.interval)  # every client waits first: nobody scans that fast
            if self._clock() > deadline:
                raise RegistrationExpired(f"nobody scanned the code within {min(pending.expires_in, cap):.0f} s")
            try:
                answer = await self._call("poll", {"device_code": pending.device_code})
            except DingTalkError as exc:  # a RegistrationError, or DingTalk out of reach
                trouble_since = trouble_since if trouble_since is not None else self._clock()
                if self._clock() - trouble_since > RETRY_WINDOW:
                    raise
                log.info("registration: polling failed (%s); trying again", exc)
                continue
            trouble_since = None
            status = str(answer.get("status") or "WAITING").upper()
            if status == "SUCCESS":
                client_id, secret = answer.get("client_id"), answer.get("client_secret")
                if not isinstance(client_id, str) or not isinstance(secret, str) or not client_id or not secret:
                    raise RegistrationError("DingTalk reported success without the new app's credentials")
                return NewApp(client_id, Secret(secret, "registration"))
            if status == "FAIL":
                raise RegistrationRefused(str(answer.get("fail_reason") or "the authorization failed"))
            if status == "EXPIRED":
                raise RegistrationExpired("the code expired")

    async def _call(self, step: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self._base}/app/registration/{step}"
        status, raw = await exchange(
            self._session, "POST", url, what=f"registration {step}", timeout=self._timeout, json=body
        )
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if status != 200 or not isinstance(payload, dict):
            raise RegistrationError(f"{step}: DingTalk answered HTTP {status}", status=status)
        if payload.get("errcode") not in (0, None):
            raise RegistrationError(f"{step}: DingTalk refused ({payload.get('errcode')}: {payload.get('errmsg')})",
                                    status=status, code=str(payload.get("errcode")))
        return payload


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else default
