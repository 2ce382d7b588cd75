"""Configuration: load the YAML, fill defaults from the environment, validate, resolve secrets.

The file is the original dify-on-dingtalk `.bots.yaml` shape, extended: top-level keys are the old `.env`
names in lower case and act as defaults for every bot, and a bot may override any of them. Every problem is
collected and reported at once, each named by its key path (`bots[1].dify_app_api_key: missing`), so an admin
fixes a file in one round. Secrets are wrapped in `Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import hmac
import importlib.util
import math
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

import yaml

from dingdifyd.errors import ConfigError

APP_TYPES = ("chatbot", "agent", "chatflow", "workflow", "completion", "auto")
SESSION_SCOPES = ("user", "chat")
SHOW_REASONING = ("hide", "quote")  # a model's <think> reasoning: hidden, or a quoted section above the answer
MARKDOWN_TABLES = ("list", "code", "keep")  # DingTalk garbles tables: rows as a list, a code block, or as written
IMAGE_DELIVERY = ("card", "message")  # Dify's images: inside the card, or as image messages after it
DEFAULT_IMAGE_QUERY = "Please describe this picture."
DEFAULT_FILE_QUERY = "Please read the attached file."
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_KEYS = ("dingtalk_app_client_secret", "dify_app_api_key")
# DingTalk context a Dify app may declare as inputs, and the variable each goes to by default (`dify_inputs`).
# `sys_user_id` is what dify-on-dingtalk passed, so apps built for it keep working.
DIFY_CONTEXT_INPUTS = {
    "staff_id": "sys_user_id",
    "nick": "sys_user_nick",
    "chat_type": "sys_chat_type",
    "chat_title": "sys_chat_title",
    "robot_code": "sys_robot_code",
}
DEFAULT_ACCESS_DENIED_REPLY = "Sorry, you are not allowed to use this bot. Please ask its admin for access."
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
DAEMON_GROUP = "dingdifyd"  # the packaged units' account (User=/Group=dingdifyd), which must read the file


# Secrets are compared (a reload restarts a bot whose secret changed) by a keyed digest, never by value: the
# key is drawn once per supervisor, and its bot processes inherit it, so they compare the same way.
_DIGEST_KEY = secrets.token_bytes(32)


class SealedSecretError(RuntimeError):
    """A sealed secret's value was asked for: only the bot process that owns it loads it (`unseal_bot`)."""


class Secret:
    """A secret string. `str()` and `repr()` never reveal it; `reveal()` does, for the one place that sends it.

    A sealed secret knows where it comes from and a digest of it, not its value: the supervisor holds only
    sealed ones, so that no bot process (they are forked from it) inherits another bot's secrets."""

    __slots__ = ("_digest", "_value", "source")

    def __init__(self, value: str | None, source: str = "inline", *, digest: bytes | None = None):
        self._value = value
        self.source = source
        if digest is None:
            digest = hmac.new(_DIGEST_KEY, (value or "").encode("utf-8", "surrogatepass"), "sha256").digest()
        self._digest = digest

    def reveal(self) -> str:
        if self._value is None:
            raise SealedSecretError(f"a sealed secret ({self.source}) has no value here")
        return self._value

    def sealed(self) -> Secret:
        return Secret(None, self.source, digest=self._digest)

    @property
    def is_sealed(self) -> bool:
        return self._value is None

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(other._digest, self._digest)

    def __hash__(self) -> int:
        return hash(self._digest)


@dataclass(frozen=True)
class RouteConfig:
    """Messages from these DingTalk conversations go to another Dify app (own client, own contexts)."""

    name: str
    conversation_ids: tuple[str, ...]
    dify_app_type: str
    dify_app_api_key: Secret
    dify_open_api_url: str
    dify_input_variable: str | None = None


@dataclass(frozen=True)
class BotConfig:
    """One robot: a DingTalk app bound to a Dify app. Field names are the YAML keys."""

    name: str
    dingtalk_app_client_id: str
    dingtalk_app_client_secret: Secret
    dify_app_type: str
    dify_app_api_key: Secret
    dify_open_api_url: str = "https://api.dify.ai/v1"
    dify_files_url: str | None = None  # Dify's FILES_URL, when its files are served from another origin
    dify_conversation_remain_time: float = 15.0  # minutes of inactivity before the context resets
    dingtalk_ai_card_template_id: str | None = None  # None: DingTalk's built-in AI card template
    dingtalk_api_base: str = "https://api.dingtalk.com"
    dingtalk_oapi_base: str = "https://oapi.dingtalk.com"
    state_dir: str = ""
    store: str = "disk"
    log_level: str = "INFO"
    session_scope: str = "user"
    allow_users: tuple[str, ...] | None = None
    allow_groups: tuple[str, ...] | None = None
    deny_users: tuple[str, ...] = ()
    deny_groups: tuple[str, ...] = ()
    access_denied_reply: str = DEFAULT_ACCESS_DENIED_REPLY  # "": refuse silently
    # workflow / completion: the input that receives the user's text; None: found via GET /parameters
    dify_input_variable: str | None = None
    # DingTalk context -> Dify input variable, passed only when the app declares that variable
    dify_inputs: dict[str, str] = field(default_factory=lambda: dict(DIFY_CONTEXT_INPUTS), hash=False)
    show_progress: bool = True  # tool calls and workflow steps shown in the card until the answer starts
    show_suggested_questions: bool = True  # when the Dify app has "suggested questions after answer" on
    suggested_questions_timeout: float = 2.0  # the final answer waits at most this long for them
    routes: tuple[RouteConfig, ...] = ()
    dify_connect_timeout: float = 10.0
    dify_first_byte_timeout: float = 60.0  # until the response headers arrive
    dify_idle_timeout: float = 60.0  # between two events; Dify pings every 10 s
    dify_total_timeout: float = 1200.0  # one whole answer; Dify's own APP_MAX_EXECUTION_TIME is 1200 s
    # answers in flight at one Dify (its base URL), counted across the bots and hosts sharing state with this
    # one; more wait in a fair queue. A stock Dify (database pool 30 + 10) survives 10 with room to spare
    dify_max_concurrency: int = 10
    max_message_chars: int = 20000  # longer messages are refused with a clear reply, not sent to Dify
    dingtalk_timeout: float = 10.0  # every DingTalk OpenAPI call
    card_update_interval: float = 0.5  # seconds between two intermediate updates of one card
    card_update_min_chars: int = 8  # fewer new characters than this wait for the next interval
    dingtalk_card_qps: float = 18.0  # card calls per second per app; DingTalk refuses above 20
    dingtalk_api_monthly_budget: int | None = None  # DingTalk calls a month; card updates are spread to fit
    command_prefix: str = "/"
    show_reasoning: str = "hide"
    markdown_tables: str = "list"
    image_delivery: str = "card"
    default_image_query: str = DEFAULT_IMAGE_QUERY  # what is asked for a picture sent without text
    default_file_query: str = DEFAULT_FILE_QUERY  # ... and for a file or video sent without text
    handler: str = "DifyAiCardBotHandler"  # accepted for compatibility, ignored
    max_workers: int = 2  # accepted for compatibility, ignored

    @property
    def conversation_ttl(self) -> float:
        return self.dify_conversation_remain_time * 60.0

    @property
    def dify_public_base(self) -> str:
        """Dify's host without the `/v1` suffix, for the relative `/files/...` URLs it returns."""
        url = self.dify_open_api_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class DaemonConfig:
    path: str
    bots: tuple[BotConfig, ...]
    log_level: str = "INFO"
    stop_timeout: float = 30.0  # graceful stop: how long in-flight answers may take to finish
    heartbeat_timeout: float = 30.0  # a child whose loop is silent this long is replaced
    restart_delay_min: float = 1.0  # back-off before restarting a crashed bot process, doubling per crash
    restart_delay_max: float = 60.0
    metrics_listen: str | None = None  # HOST:PORT or unix:/PATH: the Prometheus endpoint; None: off
    status_socket: str | None = None  # None: $RUNTIME_DIRECTORY/status.sock (paths.py); "off": none
    start_timeout: float = 30.0  # READY=1 at the latest this long after the start (or a reload)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def bot(self, name: str) -> BotConfig:
        for bot in self.bots:
            if bot.name == name:
                return bot
        raise KeyError(name)


# Keys that may stand at the top level (defaults for every bot) and be overridden per bot.
INHERITED_KEYS = (
    "dify_open_api_url",
    "dify_files_url",
    "dify_conversation_remain_time",
    "dingtalk_ai_card_template_id",
    "dingtalk_api_base",
    "dingtalk_oapi_base",
    "state_dir",
    "store",
    "log_level",
    "session_scope",
    "allow_users",
    "allow_groups",
    "deny_users",
    "deny_groups",
    "access_denied_reply",
    "dify_input_variable",
    "dify_inputs",
    "show_progress",
    "show_suggested_questions",
    "suggested_questions_timeout",
    "dify_connect_timeout",
    "dify_first_byte_timeout",
    "dify_idle_timeout",
    "dify_total_timeout",
    "dify_max_concurrency",
    "max_message_chars",
    "dingtalk_timeout",
    "card_update_interval",
    "card_update_min_chars",
    "dingtalk_card_qps",
    "dingtalk_api_monthly_budget",
    "command_prefix",
    "show_reasoning",
    "markdown_tables",
    "image_delivery",
    "default_image_query",
    "default_file_query",
)
DAEMON_KEYS = (
    "stop_timeout", "heartbeat_timeout", "restart_delay_min", "restart_delay_max", "start_timeout", "metrics_listen",
    "status_socket",
)  # fmt: skip
# Old `.env` names with no meaning here; accepted so an old EnvironmentFile does not produce noise.
IGNORED_TOP_KEYS = ("default_max_workers",)
BOT_ONLY_KEYS = (
    "name",
    "dingtalk_app_client_id",
    "dingtalk_app_client_secret",
    "dingtalk_app_client_secret_file",
    "dify_app_type",
    "dify_app_api_key",
    "dify_app_api_key_file",
    "handler",
    "max_workers",
    "routes",
)
ROUTE_KEYS = (
    "name",
    "conversation_ids",
    "dify_app_type",
    "dify_app_api_key",
    "dify_app_api_key_file",
    "dify_open_api_url",
    "dify_input_variable",
)
# Every number a file may set, and the values it may take (inclusive). Wider than any sensible setting, narrow
# enough that nothing downstream overflows or waits for ever; NaN and infinity are never accepted.
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "stop_timeout": (0.0, 3600.0),
    "heartbeat_timeout": (1.0, 3600.0),
    "restart_delay_min": (0.01, 3600.0),
    "restart_delay_max": (0.01, 86400.0),
    "start_timeout": (1.0, 3600.0),
    "dify_conversation_remain_time": (0.0, 525600.0),  # minutes: up to a year; 0: a new conversation each time
    "suggested_questions_timeout": (0.0, 60.0),
    "dify_connect_timeout": (0.1, 600.0),
    "dify_first_byte_timeout": (0.1, 3600.0),
    "dify_idle_timeout": (0.1, 3600.0),
    "dify_total_timeout": (1.0, 86400.0),
    "dingtalk_timeout": (0.1, 600.0),
    "card_update_interval": (0.0, 60.0),
    "dingtalk_card_qps": (0.1, 1e6),  # far above DingTalk's 20: the benchmarks lift the simulator's limit
    "card_update_min_chars": (0, 10000),
    "max_message_chars": (1, 1_000_000),
    "dify_max_concurrency": (1, 10_000),
    "dingtalk_api_monthly_budget": (1, 1_000_000_000),
}
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BotConfig) if f.default is not dataclasses.MISSING}
_FIELD_DEFAULTS["dify_inputs"] = DIFY_CONTEXT_INPUTS


def load(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *, secrets_of: str | None = None
) -> DaemonConfig:
    """Read and validate a config file. Raises ConfigError naming every problem. `secrets_of`: read the
    secrets of that bot only (the others' are left sealed and unread), as its bot process does."""
    environ = os.environ if environ is None else environ
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError([f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}"]) from None
    return parse(raw, str(path), environ, secrets_of=secrets_of)


def parse(
    raw: Any, path: str, environ: Mapping[str, str] | None = None, *, secrets_of: str | None = None
) -> DaemonConfig:
    """Validate an already read configuration (e.g. one `dingdifyd setup` is about to write). Raises ConfigError."""
    loader = _Loader(path, os.environ if environ is None else environ, secrets_of=secrets_of)
    config = loader.build(raw)
    if loader.problems:
        raise ConfigError(loader.problems)
    return config


class _Loader:
    def __init__(self, path: str, environ: Mapping[str, str], *, secrets_of: str | None = None):
        self.path = path
        self.environ = environ
        self.secrets_of = secrets_of  # None: every bot's secrets
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self._bot_name = ""  # the bot being read

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def build(self, raw: Any) -> DaemonConfig:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.problems.append(f"{self.path}: the top level must be a mapping with a `bots:` list")
            return DaemonConfig(path=self.path, bots=())
        for key in raw:
            if key not in (*INHERITED_KEYS, *DAEMON_KEYS, *IGNORED_TOP_KEYS, "bots"):
                self.warnings.append(f"{key}: unknown key, ignored")
        defaults = self.top_level_defaults(raw)
        daemon = {key: self.number(key, raw.get(key, default), NUMBER_RANGES[key]) for key, default in (
            ("stop_timeout", 30.0), ("heartbeat_timeout", 30.0), ("restart_delay_min", 1.0),
            ("restart_delay_max", 60.0), ("start_timeout", 30.0),
        )}  # fmt: skip
        if daemon["restart_delay_max"] < daemon["restart_delay_min"]:
            self.problem("restart_delay_max", "must be >= restart_delay_min")
        daemon["metrics_listen"] = self.listen_address("metrics_listen", raw.get("metrics_listen"))
        daemon["status_socket"] = self.socket_path("status_socket", raw.get("status_socket"))
        bots_raw = raw.get("bots")
        bots: list[tuple[int, BotConfig]] = []
        if bots_raw is None:
            self.problem("bots", "missing (a list of robots)")
        elif not isinstance(bots_raw, list) or not bots_raw:
            self.problem("bots", "must be a non-empty list of robots")
        else:
            for index, bot_raw in enumerate(bots_raw):
                bot = self.bot(f"bots[{index}]", bot_raw, defaults)
                if bot is not None:
                    bots.append((index, bot))
        seen: dict[str, int] = {}
        for index, bot in bots:
            if bot.name in seen:
                self.problem(f"bots[{index}].name", f"duplicate of bots[{seen[bot.name]}].name ({bot.name!r})")
            seen.setdefault(bot.name, index)
        return DaemonConfig(
            path=self.path,
            bots=tuple(bot for _, bot in bots),
            log_level=defaults["log_level"],
            warnings=tuple(self.warnings),
            **daemon,
        )

    def top_level_defaults(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The file's top-level value, else the environment's upper-case name, else the built-in default."""
        values: dict[str, Any] = {}
        for key in INHERITED_KEYS:
            if key in raw:
                values[key] = raw[key]
            elif key.upper() in self.environ and self.environ[key.upper()] != "":
                values[key] = _from_env(self.environ[key.upper()])
            elif key == "state_dir":
                values[key] = self.default_state_dir()
            else:
                values[key] = _FIELD_DEFAULTS[key]
        values["log_level"] = self.choice("log_level", values["log_level"], LOG_LEVELS, upper=True)
        return values

    def default_state_dir(self) -> str:
        if self.environ.get("STATE_DIRECTORY"):
            # systemd may pass several, colon-separated; the first is ours.
            return self.environ["STATE_DIRECTORY"].split(":")[0]
        if self.environ.get("XDG_STATE_HOME"):
            return os.path.join(self.environ["XDG_STATE_HOME"], "dingdifyd")
        # never a shared place such as /tmp: without HOME, the account's own home directory
        home = self.environ.get("HOME") or _account_home()
        if not home:
            self.problem("state_dir", "not set, and neither STATE_DIRECTORY, XDG_STATE_HOME nor HOME says where")
            return ""
        return os.path.join(home, ".local/state", "dingdifyd")

    def bot(self, where: str, raw: Any, defaults: dict[str, Any]) -> BotConfig | None:
        if not isinstance(raw, dict):
            self.problem(where, "must be a mapping (name, dingtalk_app_client_id, ...)")
            return None
        for key in raw:
            if key not in (*INHERITED_KEYS, *BOT_ONLY_KEYS):
                self.warnings.append(f"{where}.{key}: unknown key, ignored")
        name = raw.get("name")
        if name is None or str(name).strip() == "":
            self.problem(f"{where}.name", "missing")
            name = f"bot{where[5:-1]}"
        name = str(name).strip()
        self._bot_name = name
        if "/" in name or name.startswith(".") or "\0" in name:
            self.problem(f"{where}.name", "must not contain '/' or start with '.' (it names a state directory)")
        merged = {**defaults, **{k: v for k, v in raw.items() if k in INHERITED_KEYS}}

        def at(key: str) -> str:
            """A bad inherited value is named where it is written: in the bot, or at the top level."""
            return f"{where}.{key}" if key in raw else key

        p = f"{where}."
        values: dict[str, Any] = {
            "name": name,
            "dingtalk_app_client_id": self.required_str(
                p + "dingtalk_app_client_id", raw.get("dingtalk_app_client_id")
            ),
            "dingtalk_app_client_secret": self.secret(where, name, "dingtalk_app_client_secret", raw),
            "dify_app_type": self.choice(p + "dify_app_type", raw.get("dify_app_type"), APP_TYPES, required=True),
            "dify_app_api_key": self.secret(where, name, "dify_app_api_key", raw),
            "dify_open_api_url": self.url(at("dify_open_api_url"), merged["dify_open_api_url"]),
            "dify_files_url": None if self.optional_str(merged["dify_files_url"]) is None
            else self.url(at("dify_files_url"), merged["dify_files_url"]),
            "dify_conversation_remain_time": self.number(
                at("dify_conversation_remain_time"), merged["dify_conversation_remain_time"],
                NUMBER_RANGES["dify_conversation_remain_time"],
            ),
            "dingtalk_ai_card_template_id": self.optional_str(merged["dingtalk_ai_card_template_id"]),
            "dingtalk_api_base": self.url(at("dingtalk_api_base"), merged["dingtalk_api_base"]),
            "dingtalk_oapi_base": self.url(at("dingtalk_oapi_base"), merged["dingtalk_oapi_base"]),
            "state_dir": self.required_str(at("state_dir"), merged["state_dir"]),
            "store": self.store(at("store"), merged["store"]),
            "log_level": self.choice(at("log_level"), merged["log_level"], LOG_LEVELS, upper=True),
            "session_scope": self.choice(at("session_scope"), merged["session_scope"], SESSION_SCOPES),
            "allow_users": self.id_list(at("allow_users"), merged["allow_users"]),
            "allow_groups": self.id_list(at("allow_groups"), merged["allow_groups"]),
            "deny_users": self.id_list(at("deny_users"), merged["deny_users"]) or (),
            "deny_groups": self.id_list(at("deny_groups"), merged["deny_groups"]) or (),
            "access_denied_reply": self.text(at("access_denied_reply"), merged["access_denied_reply"]),
            "dify_input_variable": self.optional_str(merged["dify_input_variable"]),
            "dify_inputs": self.context_inputs(at("dify_inputs"), merged["dify_inputs"]),
            "show_progress": self.boolean(at("show_progress"), merged["show_progress"]),
            "show_suggested_questions": self.boolean(
                at("show_suggested_questions"), merged["show_suggested_questions"]
            ),
            "suggested_questions_timeout": self.number(
                at("suggested_questions_timeout"), merged["suggested_questions_timeout"],
                NUMBER_RANGES["suggested_questions_timeout"],
            ),
            "command_prefix": self.required_str(at("command_prefix"), merged["command_prefix"]),
            "show_reasoning": self.choice(at("show_reasoning"), merged["show_reasoning"], SHOW_REASONING),
            "markdown_tables": self.choice(at("markdown_tables"), merged["markdown_tables"], MARKDOWN_TABLES),
            "image_delivery": self.choice(at("image_delivery"), merged["image_delivery"], IMAGE_DELIVERY),
            "default_image_query": self.required_str(at("default_image_query"), merged["default_image_query"]),
            "default_file_query": self.required_str(at("default_file_query"), merged["default_file_query"]),
            "handler": str(raw.get("handler", _FIELD_DEFAULTS["handler"])),
            "max_workers": raw.get("max_workers", _FIELD_DEFAULTS["max_workers"]),
        }
        for key in (
            "dify_connect_timeout", "dify_first_byte_timeout", "dify_idle_timeout", "dify_total_timeout",
            "dingtalk_timeout", "card_update_interval", "dingtalk_card_qps",
        ):  # fmt: skip
            values[key] = self.number(at(key), merged[key], NUMBER_RANGES[key])
        for key in ("card_update_min_chars", "max_message_chars", "dify_max_concurrency"):
            values[key] = self.whole_number(at(key), merged[key], NUMBER_RANGES[key])
        budget = merged["dingtalk_api_monthly_budget"]  # none: no budget, only DingTalk's own quota
        if self.optional_str(budget) is not None:
            key = "dingtalk_api_monthly_budget"
            budget = self.whole_number(at(key), budget, NUMBER_RANGES[key])
        values["dingtalk_api_monthly_budget"] = None if self.optional_str(budget) is None else budget
        values["routes"] = self.routes(where, name, raw.get("routes"), values["dify_open_api_url"])
        if isinstance(values["dingtalk_app_client_secret"], Secret) and isinstance(values["dify_app_api_key"], Secret):
            return BotConfig(**values)
        return None

    def routes(self, where: str, bot_name: str, raw: Any, default_url: str) -> tuple[RouteConfig, ...]:
        """`routes:`: per-conversation Dify apps. Each conversation id may be routed once."""
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.problem(f"{where}.routes", "must be a list of {conversation_ids, dify_app_api_key, dify_app_type}")
            return ()
        routes: list[RouteConfig] = []
        routed: dict[str, str] = {}
        for index, item in enumerate(raw):
            at = f"{where}.routes[{index}]"
            if not isinstance(item, dict):
                self.problem(at, "must be a mapping (conversation_ids, dify_app_api_key, dify_app_type)")
                continue
            for key in item:
                if key not in ROUTE_KEYS:
                    self.warnings.append(f"{at}.{key}: unknown key, ignored")
            name = str(item.get("name") or f"route{index}").strip()
            if not name.replace("-", "").replace("_", "").isalnum():
                self.problem(f"{at}.name", "letters, digits, '-' and '_' only (it names the route's contexts)")
            if any(route.name == name for route in routes):
                self.problem(f"{at}.name", f"duplicate route name {name!r}")
            ids = self.id_list(f"{at}.conversation_ids", item.get("conversation_ids"))
            if not ids:
                self.problem(f"{at}.conversation_ids", "missing (a list of DingTalk conversation ids, cid...==)")
            for conversation_id in ids or ():
                if conversation_id in routed:
                    self.problem(f"{at}.conversation_ids", f"{conversation_id} is already in {routed[conversation_id]}")
                routed.setdefault(conversation_id, at)
            app_type = self.choice(f"{at}.dify_app_type", item.get("dify_app_type"), APP_TYPES, required=True)
            # a route's key as a systemd credential: <bot>.<route>.dify_app_api_key
            key = self.secret(at, f"{bot_name}.{name}", "dify_app_api_key", item)
            url = self.url(f"{at}.dify_open_api_url", item.get("dify_open_api_url") or default_url)
            if key is not None:
                routes.append(
                    RouteConfig(
                        name=name,
                        conversation_ids=ids or (),
                        dify_app_type=app_type,
                        dify_app_api_key=key,
                        dify_open_api_url=url,
                        dify_input_variable=self.optional_str(item.get("dify_input_variable")),
                    )
                )
        return tuple(routes)

    # --- value checks: each records a problem and returns a placeholder, so checking goes on ---

    def required_str(self, key: str, value: Any) -> str:
        if value is None or str(value).strip() == "" or isinstance(value, dict | list):
            self.problem(key, "missing" if value in (None, "") else "must be a string")
            return ""
        return str(value).strip()

    def text(self, key: str, value: Any) -> str:
        """Free text that may be empty (e.g. a reply to switch off with "")."""
        if value is None:
            return ""
        if isinstance(value, dict | list):
            self.problem(key, "must be a string")
            return ""
        return str(value).strip()

    def boolean(self, key: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text not in _FALSE:
            self.problem(key, f"{value!r} is not true or false")
        return False

    def context_inputs(self, key: str, value: Any) -> dict[str, str]:
        """`dify_inputs`: which Dify variable gets which piece of DingTalk context; null or "" switches one off.
        Keys not given keep their defaults."""
        mapping = dict(DIFY_CONTEXT_INPUTS)
        if value is None:
            return mapping
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping of {', '.join(DIFY_CONTEXT_INPUTS)} to variable names")
            return mapping
        for name, variable in value.items():
            if name not in DIFY_CONTEXT_INPUTS:
                self.problem(f"{key}.{name}", f"unknown; one of: {', '.join(DIFY_CONTEXT_INPUTS)}")
            elif variable is None or str(variable).strip() == "":
                mapping.pop(name, None)
            elif isinstance(variable, dict | list):
                self.problem(f"{key}.{name}", "must be a variable name")
            else:
                mapping[name] = str(variable).strip()
        return mapping

    @staticmethod
    def optional_str(value: Any) -> str | None:
        if value is None or str(value).strip() in ("", "null", "None"):
            return None
        return str(value).strip()

    def choice(
        self, key: str, value: Any, allowed: tuple[str, ...], required: bool = False, upper: bool = False
    ) -> str:
        if value is None or value == "":
            if required:
                self.problem(key, f"missing (one of: {', '.join(allowed)})")
            return allowed[0]
        text = str(value).strip()
        text = text.upper() if upper else text.lower()
        if text not in allowed:
            self.problem(key, f"{value!r} is not one of: {', '.join(allowed)}")
            return allowed[0]
        return text

    def number(self, key: str, value: Any, limits: tuple[float, float], *, whole: bool = False) -> float:
        """A number within `limits` (inclusive); `whole`: an integer. NaN and infinity are never within."""
        minimum, maximum = limits
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.problem(key, f"{value!r} is not a number")
            return minimum
        kind = "a whole number" if whole else "a number"
        in_range = math.isfinite(number) and minimum <= number <= maximum
        if isinstance(value, bool) or not in_range or (whole and not number.is_integer()):
            self.problem(key, f"{value!r} must be {kind} from {_bound(minimum)} to {_bound(maximum)}")
            return minimum
        return number

    def listen_address(self, key: str, value: Any) -> str | None:
        """`HOST:PORT`, `[IPV6]:PORT` or `unix:/PATH`; none (the default): off."""
        text = self.optional_str(value)
        if text is None or text.lower() in ("off", "false", "no"):
            return None
        from dingdifyd.supervisor.endpoints import parse_listen  # the one parser, also used to bind

        try:
            parse_listen(text)
        except ValueError as exc:
            self.problem(key, f"{value!r}: {exc}")
        return text

    def socket_path(self, key: str, value: Any) -> str | None:
        text = self.optional_str(value)
        if text is None or text == "off":
            return text
        if not text.startswith("/"):
            self.problem(key, f"{value!r} must be an absolute path, or off")
        return text
    def whole_number(self, key: str, value: Any, limits: tuple[float, float]) -> int:
        return int(self.number(key, value, limits, whole=True))

    def url(self, key: str, value: Any) -> str:
        text = str(value or "").strip().rstrip("/")
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problem(key, f"{value!r} is not an http(s) URL")
        return text

    def store(self, key: str, value: Any) -> str:
        text = str(value or "").strip()
        if text != "disk" and not text.startswith(("redis://", "rediss://", "unix://")):
            self.problem(key, f"{redact_url(text)!r} must be 'disk' or a redis:// URL")
        elif text != "disk" and importlib.util.find_spec("redis") is None:
            self.problem(key, "a redis store needs the redis package: pip install 'dingdifyd[redis]'")
        return text

    def id_list(self, key: str, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if isinstance(value, tuple):  # a built-in default
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            self.problem(key, "must be a list of ids")
            return None
        return tuple(str(v) for v in value)

    def secret(self, where: str, bot_name: str, key: str, raw: dict[str, Any]) -> Secret | None:
        """Inline value, `<key>_file`, or the systemd credential `<bot>.<key>`, in that order."""
        if self.secrets_of is not None and self._bot_name != self.secrets_of:
            return Secret(None, "not read")  # another bot's: its own process reads it
        inline = raw.get(key)
        if inline is not None and str(inline).strip() != "":
            if isinstance(inline, dict | list):
                self.problem(f"{where}.{key}", "must be a string")
                return None
            self.warn_if_readable(f"{where}.{key}")
            return Secret(str(inline).strip(), "inline")
        file_key = f"{key}_file"
        if raw.get(file_key):
            return self.read_secret(f"{where}.{file_key}", Path(str(raw[file_key])), "file")
        cred_dir = self.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            candidate = Path(cred_dir) / f"{bot_name}.{key}"
            try:
                present = candidate.exists()
            except OSError:  # an unreadable credentials directory: let read_secret name the problem
                present = True
            if present:
                return self.read_secret(f"{where}.{key}", candidate, "systemd credential")
        hint = f" (inline, {file_key}, or the systemd credential {bot_name}.{key})"
        self.problem(f"{where}.{key}", "missing" + hint)
        return None

    def read_secret(self, key: str, path: Path, source: str) -> Secret | None:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.problem(key, f"cannot read {path}: {reason}")
            return None
        if not value:
            self.problem(key, f"{path} is empty")
            return None
        return Secret(value, source)

    def warn_if_readable(self, key: str) -> None:
        try:
            status = os.stat(self.path)
        except OSError:
            return
        # group-readable is private when the group is the daemon's own: the .deb's root:dingdifyd 0640
        by_group = status.st_mode & stat.S_IRGRP and status.st_gid not in _daemon_gids()
        if status.st_mode & stat.S_IROTH or by_group:
            self.warnings.append(
                f"{key}: secret written inline in a file other users can read; chmod 600 {self.path} "
                f"(or 640 with group {DAEMON_GROUP}) or use a *_file / systemd credential"
            )


def _account_home() -> str:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(os.geteuid()).pw_dir
    return ""


def _bound(limit: float) -> str:
    """A range's end as people write it: 1000000, not 1e+06; 0.1 as 0.1."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


def _daemon_gids() -> set[int]:
    gids = {os.getegid()}
    with contextlib.suppress(KeyError):
        gids.add(grp.getgrnam(DAEMON_GROUP).gr_gid)
    return gids


def _from_env(text: str) -> Any:
    """Environment values are strings; `.env` files often quote them."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text


# Query parameters that carry a credential: redis-py reads `password` (the usual form for unix:// sockets) and
# `ssl_password` (the TLS key's passphrase) from the URL; anything named like a secret is treated alike.
_SECRET_PARAMETER = re.compile(r"pass|secret|token|credential", re.IGNORECASE)


def sealed(config: DaemonConfig) -> DaemonConfig:
    """The configuration with every secret sealed: what the supervisor keeps (see Secret)."""
    bots = tuple(_with_secrets(bot, lambda secret: secret.sealed()) for bot in config.bots)
    return dataclasses.replace(config, bots=bots)


def unseal_bot(path: str | os.PathLike[str], bot: BotConfig, environ: Mapping[str, str] | None = None) -> BotConfig:
    """`bot` (as the supervisor knows it, sealed) with its own secrets read again from the file, files and
    credentials, and no other bot's: what its process runs with. Raises ConfigError."""
    fresh = load(path, environ, secrets_of=bot.name)
    try:
        mine = fresh.bot(bot.name)
    except KeyError:
        raise ConfigError([f"bots: {bot.name!r} is no longer in {path}; reload the configuration"]) from None
    values = {key: getattr(mine, key) for key in SECRET_KEYS}
    routes_now = {route.name: route for route in mine.routes}
    routes = []
    for route in bot.routes:
        if route.name not in routes_now:
            raise ConfigError([f"{bot.name}.routes: {route.name!r} is no longer in {path}; reload the configuration"])
        routes.append(dataclasses.replace(route, dify_app_api_key=routes_now[route.name].dify_app_api_key))
    return dataclasses.replace(bot, routes=tuple(routes), **values)


def _with_secrets(bot: BotConfig, change: Callable[[Secret], Secret]) -> BotConfig:
    routes = tuple(dataclasses.replace(r, dify_app_api_key=change(r.dify_app_api_key)) for r in bot.routes)
    return dataclasses.replace(bot, routes=routes, **{key: change(getattr(bot, key)) for key in SECRET_KEYS})


def bot_secrets(bot: BotConfig) -> list[Secret]:
    """Every secret of a bot: its own and its routes'."""
    return [*(getattr(bot, key) for key in SECRET_KEYS), *(route.dify_app_api_key for route in bot.routes)]


def redact_url(url: str) -> str:
    """A URL without its credentials, for output and logs: the password of the user part
    (`redis://:secret@host` -> `redis://:***@host`) and every credential in the query
    (`unix:///run/redis.sock?password=secret` -> `...?password=***`). A URL that cannot be parsed shows
    nothing but its scheme."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed host part, as redis-py's parser would
    except ValueError:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://***" if scheme.isalnum() else "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(_redact_parameter(item) for item in parts.query.split("&")) if parts.query else ""
    # put together by hand: urlunsplit drops the empty host of unix:///path
    text = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else f"{parts.scheme}:{parts.path}"
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _redact_parameter(item: str) -> str:
    name, equals, _ = item.partition("=")
    return f"{name}=***" if equals and _SECRET_PARAMETER.search(unquote_plus(name)) else item


def url_secrets(url: str) -> list[str]:
    """The credentials written in a URL (as given and decoded), for the log redaction of the process using it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += [value for name, value in parse_qsl(parts.query) if _SECRET_PARAMETER.search(name)]
    return [*found, *(unquote(value) for value in found)]


def masked(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return redact_url(value)  # a store URL with a password, in its user part or its query
    if isinstance(value, Secret):
        return f"**** ({value.source})"
    if isinstance(value, tuple):
        return [masked(item) for item in value]
    if isinstance(value, RouteConfig):
        return {f.name: masked(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def render_effective(config: DaemonConfig, reveal: Callable[[Any], Any] = masked) -> str:
    """The effective configuration as YAML, secrets masked: what `check-config` prints."""
    doc = {
        "log_level": config.log_level,
        "stop_timeout": config.stop_timeout,
        "heartbeat_timeout": config.heartbeat_timeout,
        "restart_delay_min": config.restart_delay_min,
        "restart_delay_max": config.restart_delay_max,
        "metrics_listen": config.metrics_listen,
        "status_socket": config.status_socket,
        "start_timeout": config.start_timeout,
        "bots": [{f.name: reveal(getattr(bot, f.name)) for f in dataclasses.fields(bot)} for bot in config.bots],
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
