"""Configuration: load the YAML, fill defaults from the environment, validate, resolve secrets.

The file is the original dify-on-dingtalk `.bots.yaml` shape, extended: top-level keys are the old `.env`
names in lower case and act as defaults for every bot, and a bot may override any of them. Every problem is
collected and reported at once, each named by its key path (`bots[1].dify_app_api_key: missing`), so an admin
fixes a file in one round. Secrets are wrapped in `Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from dingdifyd.errors import ConfigError

APP_TYPES = ("chatbot", "agent", "chatflow", "workflow", "completion", "auto")
SESSION_SCOPES = ("user", "chat")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECRET_KEYS = ("dingtalk_app_client_secret", "dify_app_api_key")


class Secret:
    """A secret string. `str()` and `repr()` never reveal it; `reveal()` does, for the one place that sends it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "inline"):
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class BotConfig:
    """One robot: a DingTalk app bound to a Dify app. Field names are the YAML keys."""

    name: str
    dingtalk_app_client_id: str
    dingtalk_app_client_secret: Secret
    dify_app_type: str
    dify_app_api_key: Secret
    dify_open_api_url: str = "https://api.dify.ai/v1"
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
    dify_input_variable: str = "query"  # workflow / completion: the input that receives the user's text
    dify_connect_timeout: float = 10.0
    dify_first_byte_timeout: float = 60.0  # until the response headers arrive
    dify_idle_timeout: float = 60.0  # between two events; Dify pings every 10 s
    dingtalk_timeout: float = 10.0  # every DingTalk OpenAPI call
    card_update_interval: float = 0.5  # seconds between two intermediate updates of one card
    card_update_min_chars: int = 8  # fewer new characters than this wait for the next interval
    dingtalk_card_qps: float = 18.0  # card calls per second per app; DingTalk refuses above 20
    command_prefix: str = "/"
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
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def bot(self, name: str) -> BotConfig:
        for bot in self.bots:
            if bot.name == name:
                return bot
        raise KeyError(name)


# Keys that may stand at the top level (defaults for every bot) and be overridden per bot.
INHERITED_KEYS = (
    "dify_open_api_url",
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
    "dify_input_variable",
    "dify_connect_timeout",
    "dify_first_byte_timeout",
    "dify_idle_timeout",
    "dingtalk_timeout",
    "card_update_interval",
    "card_update_min_chars",
    "dingtalk_card_qps",
    "command_prefix",
)
DAEMON_KEYS = ("stop_timeout", "heartbeat_timeout", "restart_delay_min", "restart_delay_max")
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
)
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BotConfig) if f.default is not dataclasses.MISSING}


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Read and validate a config file. Raises ConfigError naming every problem."""
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
    loader = _Loader(str(path), environ)
    config = loader.build(raw)
    if loader.problems:
        raise ConfigError(loader.problems)
    return config


class _Loader:
    def __init__(self, path: str, environ: Mapping[str, str]):
        self.path = path
        self.environ = environ
        self.problems: list[str] = []
        self.warnings: list[str] = []

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
        daemon = {
            "stop_timeout": self.number("stop_timeout", raw.get("stop_timeout", 30.0), minimum=0.0),
            "heartbeat_timeout": self.number("heartbeat_timeout", raw.get("heartbeat_timeout", 30.0), 1.0),
            "restart_delay_min": self.number("restart_delay_min", raw.get("restart_delay_min", 1.0), 0.01),
            "restart_delay_max": self.number("restart_delay_max", raw.get("restart_delay_max", 60.0), 0.01),
        }
        if daemon["restart_delay_max"] < daemon["restart_delay_min"]:
            self.problem("restart_delay_max", "must be >= restart_delay_min")
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
        base = self.environ.get("XDG_STATE_HOME") or os.path.join(self.environ.get("HOME", "/tmp"), ".local/state")
        return os.path.join(base, "dingdifyd")

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
            "dify_conversation_remain_time": self.number(
                at("dify_conversation_remain_time"), merged["dify_conversation_remain_time"], minimum=0.0
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
            "dify_input_variable": self.required_str(at("dify_input_variable"), merged["dify_input_variable"]),
            "command_prefix": self.required_str(at("command_prefix"), merged["command_prefix"]),
            "handler": str(raw.get("handler", _FIELD_DEFAULTS["handler"])),
            "max_workers": raw.get("max_workers", _FIELD_DEFAULTS["max_workers"]),
        }
        for key, minimum in (
            ("dify_connect_timeout", 0.1),
            ("dify_first_byte_timeout", 0.1),
            ("dify_idle_timeout", 0.1),
            ("dingtalk_timeout", 0.1),
            ("card_update_interval", 0.0),
            ("dingtalk_card_qps", 0.1),
        ):
            values[key] = self.number(at(key), merged[key], minimum)
        values["card_update_min_chars"] = int(
            self.number(at("card_update_min_chars"), merged["card_update_min_chars"], 0)
        )
        if isinstance(values["dingtalk_app_client_secret"], Secret) and isinstance(values["dify_app_api_key"], Secret):
            return BotConfig(**values)
        return None

    # --- value checks: each records a problem and returns a placeholder, so checking goes on ---

    def required_str(self, key: str, value: Any) -> str:
        if value is None or str(value).strip() == "" or isinstance(value, dict | list):
            self.problem(key, "missing" if value in (None, "") else "must be a string")
            return ""
        return str(value).strip()

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

    def number(self, key: str, value: Any, minimum: float) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.problem(key, f"{value!r} is not a number")
            return minimum
        if isinstance(value, bool) or number < minimum:
            self.problem(key, f"{value!r} must be a number >= {minimum:g}")
            return minimum
        return number

    def url(self, key: str, value: Any) -> str:
        text = str(value or "").strip().rstrip("/")
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problem(key, f"{value!r} is not an http(s) URL")
        return text

    def store(self, key: str, value: Any) -> str:
        text = str(value or "").strip()
        if text != "disk" and not text.startswith(("redis://", "rediss://", "unix://")):
            self.problem(key, f"{value!r} must be 'disk' or a redis:// URL")
        return text

    def id_list(self, key: str, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            self.problem(key, "must be a list of ids")
            return None
        return tuple(str(v) for v in value)

    def secret(self, where: str, bot_name: str, key: str, raw: dict[str, Any]) -> Secret | None:
        """Inline value, `<key>_file`, or the systemd credential `<bot>.<key>`, in that order."""
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
            if candidate.exists():
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
            mode = os.stat(self.path).st_mode
        except OSError:
            return
        if mode & (stat.S_IRWXG | stat.S_IRWXO) & (stat.S_IRGRP | stat.S_IROTH):
            self.warnings.append(
                f"{key}: secret written inline in a file other users can read; chmod 600 {self.path} "
                "or use a *_file / systemd credential"
            )


def _from_env(text: str) -> Any:
    """Environment values are strings; `.env` files often quote them."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text


def masked(value: Any) -> Any:
    if isinstance(value, Secret):
        return f"**** ({value.source})"
    if isinstance(value, tuple):
        return list(value)
    return value


def render_effective(config: DaemonConfig, reveal: Callable[[Any], Any] = masked) -> str:
    """The effective configuration as YAML, secrets masked: what `check-config` prints."""
    doc = {
        "log_level": config.log_level,
        "stop_timeout": config.stop_timeout,
        "heartbeat_timeout": config.heartbeat_timeout,
        "restart_delay_min": config.restart_delay_min,
        "restart_delay_max": config.restart_delay_max,
        "bots": [{f.name: reveal(getattr(bot, f.name)) for f in dataclasses.fields(bot)} for bot in config.bots],
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
