"""The table of settings: every configuration key declared once.

Each entry says what a key is called in the YAML file (dify-on-dingtalk's `.bots.yaml` and `.env` names, kept
as they were), how its value is read and checked, its default, where it may be written, the environment name
it is also taken from, where its value lands in the model (`at`: `dify.timeouts.connect` is
`bot.dify.timeouts.connect`), and a line of documentation. The loader, the model's defaults, `check-config`'s
output, the README's configuration table and the man page dingdifyd.yaml(5) are all read from here
(loader.py, model.py, render.py, docs.py).

To add a setting: add one entry below (in the group it belongs to), a field at its `at` in model.py, then run
`python -m dingdifyd.config.docs` to bring the README and the man page up to date.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dingdifyd.apptypes import CONFIGURABLE_APP_TYPES
from dingdifyd.paths import default_state_dir


class Kind(enum.Enum):
    """How a value is read and checked (readers.py)."""

    TEXT = "text"  # a non-empty string
    FREE_TEXT = "free text"  # a string that may be empty ("" switches something off)
    BOOL = "true or false"
    CHOICE = "one of"
    NUMBER = "a number"
    WHOLE = "a whole number"
    URL = "an http(s) URL"
    STORE = "disk or a redis:// URL"
    IDS = "a list of ids"
    INPUTS = "a mapping"
    LISTEN = "HOST:PORT or unix:/PATH"
    SOCKET = "an absolute path, or off"
    SECRET = "a secret"  # inline, `<key>_file`, or the systemd credential `<bot>.<key>` (`<bot>.<route>.<key>`)
    NAME = "a name"  # a bot's or a route's: read by the loader, which checks what a name may be
    ROUTES = "a list of routes"
    IGNORED = "ignored"  # accepted from dify-on-dingtalk, no meaning here


class Scope(enum.Enum):
    DAEMON = "top level only"
    BOT = "top level or bot"  # at the top level it is every bot's default; a bot may override it
    BOT_ONLY = "bot"
    ROUTE = "route"


@dataclass(frozen=True)
class Setting:
    key: str  # the YAML key
    kind: Kind
    scope: Scope
    at: str | None  # where the value lands in the model (BotConfig, RouteConfig or DaemonConfig); None: nowhere
    doc: str  # for people: Markdown with `code` only; the README and the man page show it as written
    default: Any = None  # a value, or a function of the environment (raises ValueError saying what is missing)
    limits: tuple[float, float] | None = None  # numbers: inclusive; NaN and infinity are never within
    choices: tuple[str, ...] = ()
    required: bool = False
    optional: bool = False  # null or "" means "not set" (None), whatever the kind
    env: str | None = None  # also taken from this environment variable when the file does not set it
    in_routes: bool = False  # may also be written in a route; there the bot's value is its default
    shown_default: str | None = None  # the default as the documentation says it, when not the value itself
    see: str | None = None  # the README section that says more

    @property
    def secret(self) -> bool:
        return self.kind is Kind.SECRET

    @property
    def group(self) -> str:
        """The part of the model the value belongs to: `dify`, `cards`, ...; "" for the bot (or daemon) itself."""
        return self.at.split(".")[0] if self.at and "." in self.at else ""

    @property
    def route_at(self) -> str:
        """Where a route's value lands in RouteConfig."""
        assert self.at is not None
        return self.at if self.scope is Scope.ROUTE else self.at.rsplit(".", 1)[-1]

    def default_in(self, environ: Mapping[str, str]) -> Any:
        return self.default(environ) if callable(self.default) else self.default


def _top(key: str, kind: Kind, default: Any, at: str, doc: str, **more: Any) -> Setting:
    """A setting for every bot (top level) or one (in the bot), also read from the environment under its
    upper-case name, as dify-on-dingtalk's `.env` was; `env=None`: not (a new setting rarely should be)."""
    return Setting(key, kind, Scope.BOT, at, doc, default, **{"env": key.upper(), **more})


def _bot(key: str, kind: Kind, at: str | None, doc: str, **more: Any) -> Setting:
    return Setting(key, kind, Scope.BOT_ONLY, at, doc, **more)


def _route(key: str, kind: Kind, at: str, doc: str, **more: Any) -> Setting:
    return Setting(key, kind, Scope.ROUTE, at, doc, **more)


def _daemon(key: str, kind: Kind, default: Any, doc: str, **more: Any) -> Setting:
    return Setting(key, kind, Scope.DAEMON, key if kind is not Kind.IGNORED else None, doc, default, **more)


SESSION_SCOPES = ("user", "chat")
SHOW_REASONING = ("hide", "quote")  # a model's <think> reasoning: hidden, or a quoted section above the answer
MARKDOWN_TABLES = ("list", "code", "keep")  # DingTalk garbles tables: rows as a list, a code block, or as written
IMAGE_DELIVERY = ("card", "message")  # Dify's images: inside the card, or as image messages after it
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
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
COMPATIBLE = "accepted for compatibility with dify-on-dingtalk and ignored"

K = Kind
SETTINGS: tuple[Setting, ...] = (
    # --- each bot's own ---
    _bot("name", K.NAME, "name", "unique; names the bot's log lines, its state directory and `--bot NAME`; it "
         "must not contain `/` or start with a dot", required=True),
    _bot("dingtalk_app_client_id", K.TEXT, "dingtalk.client_id", "the Client ID (formerly AppKey) of the DingTalk "
         "app whose robot is in Stream mode", required=True),
    _bot("dingtalk_app_client_secret", K.SECRET, "dingtalk.client_secret", "the DingTalk app's Client Secret "
         "(formerly AppSecret)", required=True),
    _bot("dify_app_type", K.CHOICE, "dify.app_type", "the Dify app's type: `chatbot`, `agent`, `chatflow`, "
         "`workflow`, `completion`, or `auto` to ask Dify", choices=CONFIGURABLE_APP_TYPES, required=True,
         in_routes=True, see="Dify app type and inputs"),
    _bot("dify_app_api_key", K.SECRET, "dify.api_key", "the Dify app's API key (`app-...`; Dify: the app > API "
         "Access)", required=True, in_routes=True),
    _bot("routes", K.ROUTES, "routes", "other Dify apps for some chats: a message from a conversation a route "
         "lists is answered by the route's app, with contexts of its own; its keys are below", default=(),
         shown_default="none", see="Routes: one robot, several Dify apps"),
    _bot("handler", K.IGNORED, None, COMPATIBLE),
    _bot("max_workers", K.IGNORED, None, COMPATIBLE),
    # --- a route's own (and, with in_routes, the bot's Dify keys) ---
    _route("name", K.NAME, "name", "letters, digits, `-` and `_`; names the route's contexts and its "
           "credential `BOT.ROUTE.dify_app_api_key`", shown_default="`route0`, `route1`, … by position"),
    _route("conversation_ids", K.IDS, "conversation_ids", "the conversations whose messages the route's app "
           "answers (groups' `cid...==`, or a person's 1:1 chat), a list or a string of ids separated by commas "
           "or spaces; a conversation id may be listed in one route only", required=True),
    # --- Dify: bot.dify ---
    _top("dify_open_api_url", K.URL, "https://api.dify.ai/v1", "dify.url", "Dify's Service API base URL, with "
         "its `/v1`", in_routes=True),
    _top("dify_files_url", K.URL, None, "dify.files_url", "Dify's `FILES_URL`, only when its files are served "
         "from another origin than `dify_open_api_url`'s: images and files in answers are fetched from these "
         "origins only, redirects followed within them only", optional=True, see="Pictures, files and voice"),
    _top("dify_input_variable", K.TEXT, None, "dify.input_variable", "workflow and completion apps: the input "
         "variable that receives the user's text; not set: `query` when the app has it, else the app's only "
         "text input", optional=True, in_routes=True, shown_default="found via `GET /parameters`",
         see="Dify app type and inputs"),
    _top("dify_inputs", K.INPUTS, DIFY_CONTEXT_INPUTS, "dify.inputs", "DingTalk context → Dify input variable, "
         f"passed only when the app declares that variable: a mapping of `{'`, `'.join(DIFY_CONTEXT_INPUTS)}` "
         "to variable names; keys not given keep their defaults, `null` switches one off"),
    _top("dify_connect_timeout", K.NUMBER, 10.0, "dify.timeouts.connect", "seconds to connect to Dify",
         limits=(0.1, 600.0)),
    _top("dify_first_byte_timeout", K.NUMBER, 60.0, "dify.timeouts.first_byte", "seconds until Dify starts "
         "answering", limits=(0.1, 3600.0)),
    _top("dify_idle_timeout", K.NUMBER, 60.0, "dify.timeouts.idle", "seconds of silence inside an answer stream "
         "(Dify pings every 10 s) before giving up", limits=(0.1, 3600.0)),
    _top("dify_total_timeout", K.NUMBER, 1200.0, "dify.timeouts.total", "seconds one whole answer may take, "
         "however lively its stream (Dify's own `APP_MAX_EXECUTION_TIME` is 1200); waiting in the queue of "
         "`dify_max_concurrency` counts toward none of the four timeouts", limits=(1.0, 86400.0)),
    _top("dify_max_concurrency", K.WHOLE, 10, "dify.max_concurrency", "answers in flight at one Dify (one "
         "`dify_open_api_url`) at most, counted by every bot sharing the state (and, with Redis, every host); more "
         "wait in a fair queue. Each streaming answer holds up to two of Dify's database connections, whose pool "
         "is (30 + 10) per API worker: keep this at most (30 + 10) × workers / 2, less what others use",
         limits=(1, 10_000), see="Protecting your Dify"),
    # --- DingTalk: bot.dingtalk ---
    _top("dingtalk_ai_card_template_id", K.TEXT, None, "dingtalk.card_template_id", "your AI card template "
         "(streaming key `content`); none: DingTalk's built-in AI card", optional=True),
    _top("dingtalk_api_base", K.URL, "https://api.dingtalk.com", "dingtalk.api_base", "DingTalk's OpenAPI and "
         "Stream gateway; change it only for a private deployment or a simulator"),
    _top("dingtalk_oapi_base", K.URL, "https://oapi.dingtalk.com", "dingtalk.oapi_base", "DingTalk's legacy API "
         "(media upload); change it only for a private deployment or a simulator"),
    _top("dingtalk_timeout", K.NUMBER, 10.0, "dingtalk.timeout", "seconds for each DingTalk OpenAPI call",
         limits=(0.1, 600.0)),
    _top("dingtalk_api_monthly_budget", K.WHOLE, None, "dingtalk.monthly_budget", "DingTalk API calls this bot "
         "may make a month (the standard edition's org quota is 5000); card updates are spread out to fit; not "
         "set: no budget but DingTalk's own quota", limits=(1, 1_000_000_000), optional=True,
         see="Rate limits and quota"),
    # --- AI cards: bot.cards ---
    _top("card_update_interval", K.NUMBER, 0.5, "cards.update_interval", "seconds between two intermediate "
         "updates of one card; the first text and the final answer go out at once", limits=(0.0, 60.0)),
    _top("card_update_min_chars", K.WHOLE, 8, "cards.update_min_chars", "fewer new characters than this wait "
         "up to 4 intervals", limits=(0, 10_000)),
    _top("dingtalk_card_qps", K.NUMBER, 18.0, "cards.qps", "card API calls per second per DingTalk app and API: "
         "creations, and writes into cards (DingTalk refuses above 20 per API)", limits=(0.1, 1e6),
         see="Rate limits and quota"),  # far above DingTalk's 20: the benchmarks lift the simulator's limit
    # --- conversations: bot.conversation ---
    _top("dify_conversation_remain_time", K.NUMBER, 15.0, "conversation.remain_time", "minutes of inactivity "
         "after which a chat's Dify conversation is forgotten; every message restarts the clock; `0`: a new "
         "conversation with every message", limits=(0.0, 525600.0)),  # up to a year
    _top("session_scope", K.CHOICE, "user", "conversation.session_scope", "in groups: one context per person "
         "(`user`) or one shared by the whole group (`chat`); 1:1 chats are always per person",
         choices=SESSION_SCOPES),
    _top("command_prefix", K.TEXT, "/", "conversation.command_prefix", "what starts a chat command: `/new` (a "
         "fresh conversation), `/stop` (stop the answer being written), `/help`"),
    _top("max_message_chars", K.WHOLE, 20000, "conversation.max_message_chars", "longer messages are refused "
         "with a clear reply instead of being sent to Dify", limits=(1, 1_000_000)),
    _top("default_image_query", K.TEXT, "Please describe this picture.", "conversation.default_image_query",
         "what the app is asked when a picture comes without text"),
    _top("default_file_query", K.TEXT, "Please read the attached file.", "conversation.default_file_query",
         "what the app is asked when a file or a video comes without text"),
    # --- who may use the bot: bot.access ---
    _top("allow_users", K.IDS, None, "access.allow_users", "staff ids (or DingTalk's encrypted sender ids) of "
         "the people answered in 1:1 chats and, when `allow_groups` is not set, in groups; a list or a string of "
         "ids separated by commas or spaces", shown_default="everyone", see="Access control"),
    _top("allow_groups", K.IDS, None, "access.allow_groups", "group conversation ids (`cid...==`) the bot "
         "answers in", shown_default="every group", see="Access control"),
    _top("deny_users", K.IDS, (), "access.deny_users", "people the bot never answers (deny wins over allow)"),
    _top("deny_groups", K.IDS, (), "access.deny_groups", "groups the bot never answers in (deny wins over allow)"),
    _top("access_denied_reply", K.FREE_TEXT, DEFAULT_ACCESS_DENIED_REPLY, "access.denied_reply", "the reply a "
         "refused person gets (through the chat's webhook: no card); `\"\"`: refuse silently"),
    # --- how answers look: bot.presentation ---
    _top("show_progress", K.BOOL, True, "presentation.show_progress", "show an agent's tool calls and a "
         "workflow's steps in the card until the answer starts"),
    _top("show_suggested_questions", K.BOOL, True, "presentation.show_suggested_questions", "append the app's "
         "suggested follow-up questions, when it has them switched on"),
    _top("suggested_questions_timeout", K.NUMBER, 2.0, "presentation.suggested_questions_timeout", "seconds "
         "the final answer waits at most for the suggested questions", limits=(0.0, 60.0)),
    _top("show_reasoning", K.CHOICE, "hide", "presentation.show_reasoning", "a reasoning model's `<think>` "
         "text: `hide`, or `quote` (a quoted \"Thinking\" section above the answer)", choices=SHOW_REASONING),
    _top("markdown_tables", K.CHOICE, "list", "presentation.markdown_tables", "tables in answers, which "
         "DingTalk garbles: `list` (one line per row), `code` (an aligned code block) or `keep`",
         choices=MARKDOWN_TABLES),
    _top("image_delivery", K.CHOICE, "card", "presentation.image_delivery", "images from Dify: in the card "
         "(`card`), or as image messages right after it (`message`)", choices=IMAGE_DELIVERY),
    # --- the bot's process: on BotConfig itself ---
    _top("state_dir", K.TEXT, default_state_dir, "state_dir", "where conversations and de-duplication records "
         "live, one subdirectory per bot. A directory (or its parent) owned by another account or writable by "
         "other users is refused: its files would be trusted", shown_default="`$STATE_DIRECTORY`, else "
         "`$XDG_STATE_HOME/dingdifyd`, else `~/.local/state/dingdifyd`"),
    _top("store", K.STORE, "disk", "store", "`disk` (a store under `state_dir`), or "
         "`redis://[:password@]host:6379/0` (also `rediss://`, `unix:///run/redis.sock?password=...`; a password "
         "in either place is never shown or logged) to share state between hosts", see="Several hosts (Redis)"),
    _top("log_level", K.CHOICE, "INFO", "log_level", "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`; "
         "message and answer text is logged at `DEBUG` only (the top level's is the supervisor's)",
         choices=LOG_LEVELS),
    # --- the daemon: DaemonConfig, top level only ---
    _daemon("stop_timeout", K.NUMBER, 30.0, "seconds a stopping bot lets answers in flight finish before it "
            "closes their cards; the units' `TimeoutStopSec=45s` covers the default, and a larger value asks "
            "systemd for more time", limits=(0.0, 3600.0)),
    _daemon("heartbeat_timeout", K.NUMBER, 30.0, "seconds a bot process may stay silent (its event loop stuck) "
            "before it is replaced", limits=(1.0, 3600.0)),
    _daemon("restart_delay_min", K.NUMBER, 1.0, "seconds before restarting a crashed bot process, doubling with "
            "each crash in a row, with jitter", limits=(0.01, 3600.0)),
    _daemon("restart_delay_max", K.NUMBER, 60.0, "the longest wait before restarting a crashed bot process; at "
            "least `restart_delay_min`", limits=(0.01, 86400.0)),
    _daemon("start_timeout", K.NUMBER, 30.0, "seconds to wait at start (and after a reload) for every bot to "
            "connect before telling systemd `READY=1` anyway, so one bot that cannot reach DingTalk does not hold "
            "up the others; the status line names the bots not connected, and why", limits=(1.0, 3600.0)),
    _daemon("metrics_listen", K.LISTEN, None, "the Prometheus endpoint of the instance, `127.0.0.1:9464` or "
            "`unix:/run/dingdifyd/NAME/metrics.sock`; a port in use is a configuration error (exit 78); labels are "
            "the bot's name and closed sets, never message text or user ids; read at start only",
            shown_default="off", see="Metrics"),
    _daemon("status_socket", K.SOCKET, None, "the socket `dingdifyd status` asks (mode 0660, group "
            "`dingdifyd`); run by hand: `$XDG_RUNTIME_DIR/dingdifyd/NAME.status.sock`; `off`: none; read at "
            "start only", shown_default="`/run/dingdifyd/NAME/status.sock` under systemd"),
    _daemon("default_max_workers", K.IGNORED, None, "accepted from dify-on-dingtalk's `.env` and ignored"),
)  # fmt: skip


def in_scope(*scopes: Scope) -> tuple[Setting, ...]:
    return tuple(setting for setting in SETTINGS if setting.scope in scopes)


def route_settings() -> tuple[Setting, ...]:
    """What a route may set: its own keys, then the bot's Dify keys marked `in_routes`."""
    return in_scope(Scope.ROUTE) + tuple(setting for setting in SETTINGS if setting.in_routes)


def setting(key: str, scope: Scope | None = None) -> Setting:
    for candidate in SETTINGS:
        if candidate.key == key and (scope is None or candidate.scope is scope):
            return candidate
    raise KeyError(key)


def default_of(key: str) -> Any:
    """A setting's built-in default (model.py's defaults come from here)."""
    return setting(key).default


def known_keys(settings: tuple[Setting, ...]) -> frozenset[str]:
    """The keys a file may write for these settings: a secret also as `<key>_file`."""
    return frozenset(key for s in settings for key in ((s.key, f"{s.key}_file") if s.secret else (s.key,)))


SECRET_KEYS = tuple(s.key for s in in_scope(Scope.BOT_ONLY) if s.secret)
# what a file may write at its top level, in a bot, in a route; any other key is warned about and ignored
TOP_LEVEL_KEYS = known_keys(in_scope(Scope.BOT, Scope.DAEMON)) | {"bots"}
BOT_KEYS = known_keys(in_scope(Scope.BOT, Scope.BOT_ONLY))
ROUTE_KEYS = known_keys(route_settings())
