"""`dingdifyd setup NAME`: create /etc/dingdifyd/NAME.yaml by answering questions, without copying ids around.

1. An existing NAME.yaml is only replaced when the admin says so.
2. The DingTalk robot app: created on the spot by scanning a QR code with DingTalk (dingtalk/registration.py), or
   an existing app's Client ID and Secret; either way checked by getting an access token. A refused or lapsed
   scan says what to do instead (the developer console) and goes on with existing credentials.
3. The Dify app: its API URL and key, checked, and its type found (GET /info, or the probes older Difys need).
4. The secrets: as systemd credentials (root-only files and a LoadCredential= drop-in), or as files beside the
   config (`*_file`), readable by the group dingdifyd only; never in the YAML, never printed.
5. `doctor`'s checks on the result, then the file, written atomically with owner root:dingdifyd and mode 0640
   (as far as the account running setup may).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import getpass
import grp
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import segno
import yaml

from dingdifyd import config as config_mod
from dingdifyd.apptypes import AUTO
from dingdifyd.commands.doctor import doctor_main
from dingdifyd.config import DAEMON_GROUP, SECRET_KEYS, DifyTimeouts, Secret
from dingdifyd.dify.apptype import inspect_app
from dingdifyd.dify.client import DifyClient
from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.dingtalk.registration import WAIT_CAP, AppRegistration
from dingdifyd.errors import DifyAuthError, DifyError, DingTalkAuthError, DingTalkError

DEFAULT_DIFY_URL = "https://api.dify.ai/v1"
DEFAULT_API_BASE = "https://api.dingtalk.com"
DEFAULT_OAPI_BASE = "https://oapi.dingtalk.com"
CONSOLE = "https://open-dev.dingtalk.com"
ATTEMPTS = 3  # wrong credentials are asked for again this often
EXIT_NOTHING_WRITTEN = 1


class Aborted(Exception):
    """The admin stopped (end of input): nothing is written."""


class Prompter:
    def __init__(self, stdin: TextIO, out: TextIO):
        self.stdin = stdin
        self.out = out
        self.tty = stdin.isatty() if hasattr(stdin, "isatty") else False

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def ask(self, question: str, default: str | None = None) -> str:
        self.out.write(f"{question}{f' [{default}]' if default else ''}: ")
        self.out.flush()
        line = self.stdin.readline()
        if not line:
            raise Aborted("no answer")
        return line.strip() or (default or "")

    def secret(self, question: str) -> str:
        if self.tty:
            with contextlib.suppress(EOFError):
                return getpass.getpass(f"{question} (not shown): ", stream=self.out).strip()
            raise Aborted("no answer")
        return self.ask(question)

    def choose(self, question: str, options: list[str], default: int = 1) -> int:
        for number, option in enumerate(options, 1):
            self.say(f"  {number}) {option}")
        while True:
            answer = self.ask(question, str(default))
            if answer.isdigit() and 1 <= int(answer) <= len(options):
                return int(answer)
            self.say(f"Please answer 1 to {len(options)}.")

    def confirm(self, question: str, default: bool) -> bool:
        answer = self.ask(f"{question} ({'Y/n' if default else 'y/N'})").lower()
        return default if not answer else answer in ("y", "yes")


@dataclass
class Plan:
    """What the answers add up to."""

    name: str
    bot: str
    client_id: str = ""
    client_secret: Secret | None = None
    dify_url: str = DEFAULT_DIFY_URL
    dify_key: Secret | None = None
    dify_app_type: str = AUTO
    app_note: str = ""


class Setup:
    def __init__(
        self,
        name: str,
        prompt: Prompter,
        http: aiohttp.ClientSession,
        *,
        config_dir: str,
        api_base: str,
        oapi_base: str,
        systemd_dir: str,
        registration_cap: float = WAIT_CAP,
    ):
        self.name = name
        self.prompt = prompt
        self.http = http
        self.config_dir = Path(config_dir)
        self.api_base = api_base
        self.oapi_base = oapi_base
        self.systemd_dir = Path(systemd_dir)
        self.registration_cap = registration_cap
        self.target = self.config_dir / f"{name}.yaml"

    async def run(self) -> int:
        say = self.prompt.say
        if self.target.exists() and not self.prompt.confirm(f"{self.target} exists. Replace it", default=False):
            say(f"Nothing written; {self.target} is as it was.")
            return EXIT_NOTHING_WRITTEN
        plan = Plan(self.name, self.prompt.ask("Name of the bot (in logs, state and --bot)", self.name))
        say("\nThe DingTalk robot app:")
        how = self.prompt.choose("Which", [
            "create a new one now: scan a QR code with the DingTalk app (you need to be in the organisation)",
            "use an existing app: enter its Client ID and Client Secret (developer console > the app > Credentials)",
        ])  # fmt: skip
        if how == 1 and not await self.register(plan):
            say(f"Create the app in the DingTalk developer console instead ({CONSOLE}: an enterprise internal app "
                "with a robot that receives messages in Stream mode), then enter its credentials here.")  # fmt: skip
        if not plan.client_id:
            await self.existing_app(plan)
        await self.dify(plan)
        say("\nWhere to keep the two secrets (the app's Client Secret and the Dify API key):")
        keep = self.prompt.choose("Which", [
            f"systemd credentials: root-only files in {self.config_dir / 'credentials'} and a LoadCredential= drop-in "
            "(recommended)",
            f"files beside the config, readable by the group {DAEMON_GROUP} only (*_file keys)",
        ])  # fmt: skip
        say("\nChecking the result (dingdifyd doctor):")
        await doctor_main(config_mod.parse(self.document(plan, inline=True), str(self.target), environ={}), None,
                          self.prompt.out)  # fmt: skip
        written = self.write(plan, credentials=keep == 1)
        say("\nWritten:")
        for path in written:
            say(f"  {path}")
        say(f"\nNext: {'systemctl daemon-reload && ' if keep == 1 else ''}systemctl enable --now dingdifyd@{self.name}")
        say(f"      dingdifyd status -c {self.target}")
        say("Add the robot to the groups it should answer in; with your own AI card template, set "
            "dingtalk_ai_card_template_id (the built-in one is used until then).")  # fmt: skip
        return 0

    # --- DingTalk ------------------------------------------------------------------------------------------

    async def register(self, plan: Plan) -> bool:
        say = self.prompt.say
        registration = AppRegistration(self.http, base=self.oapi_base)
        try:
            pending = await registration.begin()
        except DingTalkError as exc:  # a RegistrationError, or DingTalk out of reach
            say(f"The QR registration could not start: {exc}.")
            return False
        say("\nScan this code with the DingTalk app (请使用钉钉扫码，创建机器人应用):\n")
        say(qr_text(pending.url))
        say(f"Or open: {pending.url}")
        say(f"Code: {pending.user_code}. The page may be branded OpenClaw: DingTalk shows that for this kind of "
            "registration. Waiting for the scan (Ctrl-C to stop)...")  # fmt: skip
        try:
            app = await registration.wait(pending, cap=self.registration_cap)
        except DingTalkError as exc:  # refused, expired, or DingTalk out of reach
            say(f"The QR registration did not complete: {exc}.")
            return False
        if not await self.token_ok(app.client_id, app.client_secret):
            return False
        plan.client_id, plan.client_secret = app.client_id, app.client_secret
        say(f"DingTalk created the app {app.client_id}; its credentials work.")
        return True

    async def existing_app(self, plan: Plan) -> None:
        for _ in range(ATTEMPTS):
            client_id = self.prompt.ask("Client ID (AppKey)")
            secret = Secret(self.prompt.secret("Client Secret (AppSecret)"), "setup")
            if client_id and secret.reveal() and await self.token_ok(client_id, secret):
                plan.client_id, plan.client_secret = client_id, secret
                self.prompt.say(f"The app {client_id} got an access token.")
                return
        raise Aborted("no working DingTalk credentials")

    async def token_ok(self, client_id: str, secret: Secret) -> bool:
        api = DingTalkApi(client_id=client_id, client_secret=secret, session=self.http, api_base=self.api_base,
                          oapi_base=self.oapi_base, max_attempts=2, retry_base_delay=0.5)  # fmt: skip
        try:
            await api.access_token()
        except DingTalkAuthError:
            self.prompt.say("DingTalk refused that Client ID and Secret.")
            return False
        except (DingTalkError, TimeoutError) as exc:
            self.prompt.say(f"DingTalk could not be reached ({type(exc).__name__}) at {self.api_base}.")
            return False
        return True

    # --- Dify ----------------------------------------------------------------------------------------------

    async def dify(self, plan: Plan) -> None:
        say = self.prompt.say
        say("\nThe Dify app (Dify: the app > API Access):")
        for _ in range(ATTEMPTS):
            url = self.prompt.ask("Dify API URL", plan.dify_url).rstrip("/")
            key = Secret(self.prompt.secret("Dify app API key (app-...)"), "setup")
            plan.dify_url, plan.dify_key = url, key
            client = DifyClient(base_url=url, api_key=key, app_type=AUTO, session=self.http,
                                timeouts=DifyTimeouts(10.0, 15.0, 15.0))  # fmt: skip
            try:
                async with asyncio.timeout(30):
                    report = await inspect_app(client, AUTO)
            except DifyAuthError:
                say(f"Dify at {url} refused that key.")
                continue
            except (DifyError, TimeoutError, ValueError) as exc:
                say(f"Dify at {url} could not be asked ({type(exc).__name__}).")
                if self.prompt.confirm("Keep these and let the bot find the app's type when it starts", True):
                    plan.dify_app_type = AUTO
                    return
                continue
            name = f" {report.app_name!r}" if report.app_name else ""
            if report.only_family_known or report.actual is None:
                # the three chat kinds are answered alike; an older Dify does not say which one it is
                plan.dify_app_type = "chatbot" if report.actual else AUTO
                plan.app_note = "this Dify does not say which chat app kind; chatbot, agent and chatflow work alike"
            else:
                plan.dify_app_type = report.actual
            say(f"Dify app{name}: a {report.describe()}.")
            return
        raise Aborted("no working Dify key")

    # --- the files -----------------------------------------------------------------------------------------

    def secret_path(self, plan: Plan, key: str, *, credentials: bool) -> Path:
        if credentials:
            return self.config_dir / "credentials" / f"{plan.bot}.{key}"
        return self.config_dir / f"{self.name}.{plan.bot}.{key}"

    def document(self, plan: Plan, *, inline: bool = False, credentials: bool = True) -> dict[str, Any]:
        bot: dict[str, Any] = {"name": plan.bot, "dingtalk_app_client_id": plan.client_id,
                               "dify_app_type": plan.dify_app_type}  # fmt: skip
        secrets = {"dingtalk_app_client_secret": plan.client_secret, "dify_app_api_key": plan.dify_key}
        for key, value in secrets.items():
            if inline:
                bot[key] = value.reveal() if value is not None else ""
            elif not credentials:
                bot[f"{key}_file"] = str(self.secret_path(plan, key, credentials=False))
        doc: dict[str, Any] = {"dify_open_api_url": plan.dify_url}
        if self.api_base != DEFAULT_API_BASE:
            doc["dingtalk_api_base"] = self.api_base
        if self.oapi_base != DEFAULT_OAPI_BASE:
            doc["dingtalk_oapi_base"] = self.oapi_base
        doc["bots"] = [bot]
        return doc

    def write(self, plan: Plan, *, credentials: bool) -> list[Path]:
        written = []
        for key, value in (("dingtalk_app_client_secret", plan.client_secret), ("dify_app_api_key", plan.dify_key)):
            assert value is not None
            path = self.secret_path(plan, key, credentials=credentials)
            # a credential is read by systemd (root) only; a *_file by the service's group
            write_private(path, value.reveal() + "\n", mode=0o600 if credentials else 0o640, group=not credentials)
            written.append(path)
        if credentials:
            drop_in = self.systemd_dir / f"dingdifyd@{self.name}.service.d" / "credentials.conf"
            lines = [f"LoadCredential={plan.bot}.{key}:{self.secret_path(plan, key, credentials=True)}"
                     for key in SECRET_KEYS]  # fmt: skip
            write_private(drop_in, "# written by dingdifyd setup\n[Service]\n" + "\n".join(lines) + "\n", mode=0o644)
            written.append(drop_in)
        header = (f"# {self.target}: written by `dingdifyd setup {self.name}` on {datetime.date.today()}.\n"
                  f"# Every key: {self.config_dir / 'example.yaml'} and dingdifyd.yaml(5).\n")  # fmt: skip
        if credentials:
            names = " and ".join(f"{plan.bot}.{key}" for key in SECRET_KEYS)
            header += f"# The secrets are the systemd credentials {names}\n"
            header += f"# (LoadCredential=: `systemctl cat dingdifyd@{self.name}`).\n"
        if plan.app_note:
            header += f"# dify_app_type: {plan.app_note}.\n"
        body = yaml.safe_dump(self.document(plan, credentials=credentials), sort_keys=False, allow_unicode=True)
        write_private(self.target, header + body, mode=0o640, group=True)
        written.insert(0, self.target)
        return written


def write_private(path: Path, text: str, *, mode: int, group: bool = False) -> None:
    """Write atomically, never readable by others even for a moment; with `group`, for the group dingdifyd."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        if group:
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(temporary, -1, grp.getgrnam(DAEMON_GROUP).gr_gid)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def qr_text(url: str) -> str:
    """The QR code for a terminal: half blocks, light modules drawn, as on a dark background (with a border)."""
    out = io.StringIO()
    segno.make(url, error="l", micro=False).terminal(out=out, compact=True, border=2)
    return out.getvalue().rstrip("\n")


async def setup_main(
    name: str,
    stdin: TextIO,
    out: TextIO,
    *,
    config_dir: str = "/etc/dingdifyd",
    api_base: str = DEFAULT_API_BASE,
    oapi_base: str = DEFAULT_OAPI_BASE,
    systemd_dir: str = "/etc/systemd/system",
    registration_cap: float = WAIT_CAP,
) -> int:
    prompt = Prompter(stdin, out)
    if "/" in name or name.startswith(".") or not name:
        prompt.say(f"{name!r} cannot name an instance (it becomes {config_dir}/NAME.yaml and dingdifyd@NAME)")
        return 64
    async with aiohttp.ClientSession() as http:
        setup = Setup(name, prompt, http, config_dir=config_dir, api_base=api_base, oapi_base=oapi_base,
                      systemd_dir=systemd_dir, registration_cap=registration_cap)  # fmt: skip
        try:
            return await setup.run()
        except Aborted as exc:
            prompt.say(f"\nStopped ({exc}); nothing written.")
            return EXIT_NOTHING_WRITTEN


def run_setup(name: str, *, config_dir: str, api_base: str, oapi_base: str, systemd_dir: str) -> int:
    return asyncio.run(setup_main(name, sys.stdin, sys.stdout, config_dir=config_dir, api_base=api_base,
                                  oapi_base=oapi_base, systemd_dir=systemd_dir))  # fmt: skip
