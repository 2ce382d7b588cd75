"""`dingdifyd doctor -c FILE [--bot NAME]`: online pre-flight checks of each bot, one line each, with the fix.

What can be checked without a chat, in order (a check that needs an earlier one to pass is skipped when it
did not):
- DingTalk: the access token (client id and secret); the Stream gateway (a connection ticket, no connection
  kept); the card permissions and template, by sending a card to a place that cannot exist: DingTalk refuses a
  missing permission (403, naming the scope) and an unknown or unpublished template before it looks at the
  place, so a refusal for the place alone means both are fine; the robot permission files need, likewise.
- Dify, for the bot's app and each route's: the key, the app's kind against `dify_app_type` (`GET /info`, or a
  harmless probe on older Dify), and whether the app's required inputs can be filled from a DingTalk message.

Exit status: 0 when nothing failed (warnings allowed), 78 when something must be fixed in the configuration
or the apps, 69 when a peer could not be reached at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TextIO

import aiohttp

from dingdifyd import config as config_mod
from dingdifyd.apptypes import AUTO, TEXT_INPUT_APP_TYPES, family
from dingdifyd.bridge.inputs import TEXT_KINDS, AppParameters, input_gaps, text_input_variable
from dingdifyd.config import BotConfig, DaemonConfig, Secret
from dingdifyd.dify.apptype import AppTypeReport, inspect_app
from dingdifyd.dify.client import DifyClient
from dingdifyd.dingtalk.api import PERMISSION_DENIED_CODE, DingTalkApi
from dingdifyd.dingtalk.cards import BUILTIN_TEMPLATE_ID
from dingdifyd.dingtalk.stream import StreamConnection
from dingdifyd.errors import (
    EX_CONFIG,
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    DifyAuthError,
    DifyError,
    DingTalkAuthError,
    DingTalkError,
    DingTalkUnavailable,
    PeerError,
    UnsupportedAppMode,
    brief,
)
from dingdifyd.worker.apps import key_path

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
DIFY_TIMEOUT_CAP = 15.0  # a check waits no longer than this for Dify
PERMISSIONS_HINT = "DingTalk developer console: the app > Permissions; then publish a new version of the app"


@dataclass(frozen=True)
class Check:
    status: str  # OK | WARN | FAIL | SKIP
    name: str
    detail: str
    fix: str = ""
    exit_code: int = EX_OK  # of a FAIL: EX_CONFIG (fix something) or EX_UNAVAILABLE (a peer unreachable)


def ok(name: str, detail: str) -> Check:
    return Check(OK, name, detail)


def warn(name: str, detail: str, fix: str = "") -> Check:
    return Check(WARN, name, detail, fix)


def fail(name: str, detail: str, fix: str, exit_code: int = EX_CONFIG) -> Check:
    return Check(FAIL, name, detail, fix, exit_code)


def skip(name: str, why: str) -> Check:
    return Check(SKIP, name, why)


def render_line(bot: str, check: Check) -> str:
    line = f"{check.status:<4}  {bot}: {check.name}: {check.detail}"
    return f"{line}  → fix: {check.fix}" if check.fix else line


def exit_status(checks: Sequence[Check]) -> int:
    codes = {c.exit_code for c in checks if c.status == FAIL}
    if EX_CONFIG in codes:
        return EX_CONFIG
    return EX_UNAVAILABLE if codes else EX_OK


def _unreachable(name: str, exc: BaseException, where: str) -> Check:
    return fail(name, f"could not ask ({brief(exc)})", f"check that {where} is reachable from here", EX_UNAVAILABLE)


def _permission_denied(exc: BaseException | None) -> bool:
    return isinstance(exc, DingTalkError) and exc.status == 403 and exc.code == PERMISSION_DENIED_CODE


class BotDoctor:
    def __init__(self, bot: BotConfig, where: str, http: aiohttp.ClientSession):
        self.bot = bot
        self.where = where
        self.http = http
        self.checks: list[Check] = []
        self.api = DingTalkApi(
            client_id=bot.dingtalk.client_id, client_secret=bot.dingtalk.client_secret, session=http,
            api_base=bot.dingtalk.api_base, oapi_base=bot.dingtalk.oapi_base, timeout=bot.dingtalk.timeout,
            max_attempts=2, retry_base_delay=0.5,
        )  # fmt: skip

    async def run(self) -> list[Check]:
        if await self.token():
            await self.gateway()
            await self.cards()
        else:
            for name in ("Stream gateway", "card permission", "card template", "card streaming", "robot files"):
                self.checks.append(skip(name, "needs a DingTalk token"))
        bot = self.bot
        await self.dify("", bot.dify.url, bot.dify.api_key, bot.dify.app_type, bot.dify.input_variable,
                        self.where)  # fmt: skip
        for index, route in enumerate(bot.routes):
            await self.dify(
                f" (route {route.name})", route.url, route.api_key, route.app_type,
                route.input_variable, f"{self.where}.routes[{index}]",
            )  # fmt: skip
        return self.checks

    # --- DingTalk -------------------------------------------------------------------------------------

    async def token(self) -> bool:
        name = "DingTalk token"
        keys = f"{self.where}.dingtalk_app_client_id and .dingtalk_app_client_secret"
        try:
            await self.api.access_token()
        except DingTalkAuthError as exc:
            detail = f"DingTalk refused the client id / secret ({exc.code or exc.status})"
            self.checks.append(fail(name, detail, f"check {keys} (developer console: the app > Credentials)"))
            return False
        except (DingTalkError, TimeoutError) as exc:
            self.checks.append(_unreachable(name, exc, self.bot.dingtalk.api_base))
            return False
        self.checks.append(ok(name, f"app {self.bot.dingtalk.client_id} got an access token"))
        return True

    async def gateway(self) -> None:
        name = "Stream gateway"
        connection = StreamConnection(
            client_id=self.bot.dingtalk.client_id, client_secret=self.bot.dingtalk.client_secret,
            api_base=self.bot.dingtalk.api_base, session=self.http, on_message=lambda message: None,
            open_timeout=self.bot.dingtalk.timeout,
        )  # fmt: skip
        try:
            await connection.check_gateway()
        except DingTalkAuthError as exc:
            fix = "the robot must receive messages in Stream mode (developer console: the app > Robot)"
            self.checks.append(fail(name, f"the gateway refused the app ({exc.code or exc.status})", fix))
            return
        except (DingTalkError, OSError, TimeoutError) as exc:
            self.checks.append(_unreachable(name, exc, self.bot.dingtalk.api_base))
            return
        self.checks.append(ok(name, "a connection ticket was issued (no connection kept)"))

    async def cards(self) -> None:
        template = self.bot.dingtalk.card_template_id
        template_id = template or BUILTIN_TEMPLATE_ID
        probe = f"dingdifyd-doctor-{uuid.uuid4().hex}"
        try:
            # no staff id: the card's place (dtv1.card//IM_ROBOT.) cannot exist, so no card is ever shown
            await self.api.create_and_deliver_card(
                out_track_id=probe, template_id=template_id, card_data={"content": "", "msgContent": ""},
                conversation_type="1", conversation_id="", sender_staff_id="",
                robot_code=self.bot.dingtalk.client_id,
            )  # fmt: skip
            outcome: BaseException | None = None
        except (DingTalkError, TimeoutError) as exc:
            outcome = exc
        self.checks.extend(self._card_checks(outcome, template))
        await self._scope_probe(
            "card streaming", "Card.Streaming.Write", "the answer cannot stream into the card",
            self.api.stream_card(out_track_id=probe, key="content", content="-"), blocking=True,
        )  # fmt: skip
        await self._scope_probe(
            "robot files", "qyapi_robot_sendmsg", "pictures and files people send cannot be read",
            self.api.download_message_file(download_code=probe, robot_code=self.bot.dingtalk.client_id),
            blocking=False,
        )  # fmt: skip

    def _card_checks(self, outcome: BaseException | None, template: str | None) -> list[Check]:
        permission, shown = "card permission", template or f"the built-in AI card ({BUILTIN_TEMPLATE_ID})"
        if _permission_denied(outcome):
            fix = f"grant Card.Instance.Write ({PERMISSIONS_HINT})"
            return [fail(permission, "Card.Instance.Write is not granted: no card can be created", fix),
                    skip("card template", "needs Card.Instance.Write")]  # fmt: skip
        if isinstance(outcome, DingTalkUnavailable | TimeoutError) or (
            isinstance(outcome, DingTalkError) and outcome.status == 401
        ):
            return [_unreachable(permission, outcome, self.bot.dingtalk.api_base),
                    skip("card template", "needs the card API")]  # fmt: skip
        checks = [ok(permission, "Card.Instance.Write granted")]
        code = outcome.code if isinstance(outcome, PeerError) else None
        key = f"{self.where}.dingtalk_ai_card_template_id"
        if code == "param.templateNotExist":
            fix = f"set {key} to your AI card template's id (card platform; it ends in .schema), or remove it"
            checks.append(fail("card template", f"{shown} does not exist for this app", fix))
        elif code == "param.templateUnpublished":
            checks.append(fail("card template", f"{shown} is not published", "publish it on the card platform"))
        else:
            checks.append(ok("card template", f"{shown} accepted (a test card to a place that cannot exist was "
                                              "refused for its place only)"))  # fmt: skip
        return checks

    async def _scope_probe(
        self, name: str, scope: str, without: str, call: Awaitable[object], *, blocking: bool
    ) -> None:
        """Call an API with an id that cannot exist: a 4xx about the id means the permission is there."""
        try:
            await call
        except (DingTalkError, TimeoutError) as exc:
            if _permission_denied(exc):
                fix = f"grant {scope} ({PERMISSIONS_HINT})"
                check = fail if blocking else warn
                self.checks.append(check(name, f"{scope} is not granted: {without}", fix))
                return
            if isinstance(exc, DingTalkUnavailable | TimeoutError) or exc.status == 401:
                self.checks.append(_unreachable(name, exc, self.bot.dingtalk.api_base))
                return
        self.checks.append(ok(name, f"{scope} granted"))

    # --- Dify -----------------------------------------------------------------------------------------

    async def dify(
        self, label: str, url: str, key: Secret, configured: str, explicit_input: str | None, where: str
    ) -> None:
        limits = self.bot.dify.timeouts
        timeouts = dataclasses.replace(limits, first_byte=min(limits.first_byte, DIFY_TIMEOUT_CAP))
        client = DifyClient(base_url=url, api_key=key, app_type=configured, session=self.http, timeouts=timeouts)
        try:
            async with asyncio.timeout(DIFY_TIMEOUT_CAP * 2):
                report = await inspect_app(client, configured)
        except DifyAuthError as exc:
            fix = f"set {where}.dify_app_api_key to the app's API key (Dify: the app > API Access)"
            self.checks.append(fail(f"Dify key{label}", f"refused by {url} ({brief(exc)})", fix))
            self.checks.append(skip(f"Dify app type{label}", "needs an accepted key"))
            self.checks.append(skip(f"Dify inputs{label}", "needs an accepted key"))
            return
        except UnsupportedAppMode as exc:
            self.checks.append(ok(f"Dify key{label}", f"accepted by {url}{_version(client)}"))
            detail = f"the key belongs to a Dify {exc.mode} app (mode {exc.mode}), which cannot answer chat messages"
            fix = f"set {where}.dify_app_api_key to the key of a chatbot, agent, chatflow, workflow or completion app"
            self.checks.append(fail(f"Dify app type{label}", detail, fix))
            self.checks.append(skip(f"Dify inputs{label}", "needs an app that answers messages"))
            return
        except (DifyError, TimeoutError) as exc:
            self.checks.append(_unreachable(f"Dify key{label}", exc, url))
            self.checks.append(skip(f"Dify app type{label}", "needs Dify"))
            self.checks.append(skip(f"Dify inputs{label}", "needs Dify"))
            return
        name = f" ({report.app_name!r})" if report.app_name else ""
        self.checks.append(ok(f"Dify key{label}", f"accepted by {url}{name}{_version(client)}"))
        self.checks.append(self._app_type_check(f"Dify app type{label}", report, where))
        app_type = report.actual or (configured if configured != AUTO else "chatbot")
        try:
            async with asyncio.timeout(DIFY_TIMEOUT_CAP):
                params = AppParameters.parse(await client.parameters())
        except (DifyError, TimeoutError) as exc:
            self.checks.append(_unreachable(f"Dify inputs{label}", exc, url))
            return
        self.checks.append(self._inputs_check(f"Dify inputs{label}", params, app_type, explicit_input, where))

    @staticmethod
    def _app_type_check(name: str, report: AppTypeReport, where: str) -> Check:
        if not report.matches:
            detail = f"{report.configured!r}, but the key belongs to a {report.describe()}"
            return fail(name, detail, f"set {where}.dify_app_type: {report.actual or 'auto'}")
        mode = f" (mode {report.mode})" if report.mode else ""
        if report.configured == AUTO:
            known = report.actual and not report.only_family_known
            return ok(name, f"auto: a {report.actual} app{mode}" if known else f"auto: a {report.describe()}")
        if report.actual is None:
            return ok(name, f"{report.configured}: the app answers on the {family(report.configured)} routes")
        if report.actual != report.configured:
            return ok(name, f"{report.configured}: the app is a {report.actual}{mode}, which works the same here")
        return ok(name, f"{report.configured} matches the app{mode}")

    def _inputs_check(self, name: str, params: AppParameters, app_type: str, explicit: str | None, where: str) -> Check:
        mapping = self.bot.dify.inputs
        text_variable = text_input_variable(params, explicit, mapping)
        problems: list[str] = []
        fixes: list[str] = []
        warnings: list[str] = []
        if app_type in TEXT_INPUT_APP_TYPES and params.field(text_variable) is None:
            texts = [f.variable for f in params.fields if f.kind in TEXT_KINDS]
            if explicit:
                problems.append(f"dify_input_variable {explicit!r} is not an input of the app")
            else:
                problems.append(f"no single text input takes the message (text inputs: {', '.join(texts) or 'none'})")
            fixes.append(f"set {where}.dify_input_variable to one of: {', '.join(texts)}" if texts
                         else "add a text input (e.g. `query`) to the app's start form")  # fmt: skip
        for gap in input_gaps(params, app_type, text_variable, mapping):
            (problems if gap.blocking else warnings).append(f"`{gap.field.variable}` {gap.reason}")
            if gap.blocking:
                fixes.append(f"make `{gap.field.variable}` optional in the app, or map it with {where}.dify_inputs")
        passed = sorted(f"{v} ({k})" for k, v in mapping.items() if params.field(v) is not None)
        goes = "the message is the query"
        if app_type in TEXT_INPUT_APP_TYPES:
            goes = f"the message goes to `{text_variable}`"
        detail = goes + (f"; DingTalk context: {', '.join(passed)}" if passed else "")
        if problems:
            return fail(name, "; ".join(problems + warnings), "; ".join(fixes))
        if warnings:
            return warn(name, f"{detail}; but " + "; ".join(warnings), "make those inputs optional in the app")
        return ok(name, detail)


async def diagnose(daemon: DaemonConfig, bots: Sequence[BotConfig]) -> list[tuple[str, list[Check]]]:
    results = []
    async with aiohttp.ClientSession() as http:
        for bot in bots:
            results.append((bot.name, await BotDoctor(bot, key_path(daemon, bot), http).run()))
    return results


async def doctor_main(daemon: DaemonConfig, bot_names: Sequence[str] | None, out: TextIO) -> int:
    """Run the checks of the named bots (all when None), print one line each and a summary; the exit status."""
    names = list(bot_names or [bot.name for bot in daemon.bots])
    unknown = [name for name in names if name not in {bot.name for bot in daemon.bots}]
    if unknown:
        known = ", ".join(bot.name for bot in daemon.bots)
        out.write(f"no bot named {', '.join(map(repr, unknown))} in {daemon.path} (bots: {known})\n")
        return EX_USAGE
    results = await diagnose(daemon, [daemon.bot(name) for name in names])
    every: list[Check] = []
    for bot_name, checks in results:
        for check in checks:
            out.write(render_line(bot_name, check) + "\n")
        every.extend(checks)
    counts = {status: sum(1 for c in every if c.status == status) for status in (OK, WARN, FAIL, SKIP)}
    out.write(", ".join(f"{n} {status}" for status, n in counts.items() if n) + "\n")
    out.flush()
    return exit_status(every)


def run_doctor(config_path: str, bot_names: Sequence[str] | None, out: TextIO = sys.stdout) -> int:
    daemon = config_mod.load(config_path)
    # the lines are the report: the adapters' own warnings (retries, refusals) would only repeat them
    logging.basicConfig(level=logging.CRITICAL)
    return asyncio.run(doctor_main(daemon, bot_names, out))


def _version(client: DifyClient) -> str:
    """The Dify version the server names in its answers (`X-Version`), when it does."""
    return f", Dify {client.server_version}" if client.server_version else ""
