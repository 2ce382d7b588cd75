"""The loaded configuration: small frozen parts, so code reads `bot.dify.timeouts`, `bot.cards.update_interval`.

Which YAML key fills which field is settings.py's (each setting's `at`); nothing here repeats a key's name,
default or range. Only `DifyTimeouts` has defaults (the Dify client is also built without a configuration, by
`doctor`, `setup` and the tests), and those come from the table.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from dingdifyd.config.secret import Secret
from dingdifyd.config.settings import default_of

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass(frozen=True)
class DifyTimeouts:
    connect: float = default_of("dify_connect_timeout")  # TCP connect
    # until the response headers arrive (and, for plain JSON calls, the whole body)
    first_byte: float = default_of("dify_first_byte_timeout")
    idle: float = default_of("dify_idle_timeout")  # the longest gap between two reads of the stream; pings count
    total: float = default_of("dify_total_timeout")  # the whole answer, however lively


@dataclass(frozen=True)
class DifySettings:
    """The bot's Dify app, and how it is talked to."""

    app_type: str
    api_key: Secret
    url: str  # the Service API base, with its /v1
    files_url: str | None  # Dify's FILES_URL, when its files are served from another origin
    input_variable: str | None  # workflow / completion: the input that receives the text; None: GET /parameters
    inputs: dict[str, str] = field(hash=False)  # DingTalk context -> Dify input variable
    timeouts: DifyTimeouts
    max_concurrency: int  # answers in flight at one Dify, across the bots and hosts sharing the state

    @property
    def public_base(self) -> str:
        """Dify's host without the `/v1` suffix, for the relative `/files/...` URLs it returns."""
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class DingTalkSettings:
    """The bot's DingTalk app, and how DingTalk is talked to."""

    client_id: str
    client_secret: Secret
    card_template_id: str | None  # None: DingTalk's built-in AI card template
    api_base: str
    oapi_base: str
    timeout: float  # every OpenAPI call
    monthly_budget: int | None  # DingTalk calls a month; card updates are spread to fit. None: only the quota


@dataclass(frozen=True)
class CardSettings:
    """How often an answer's AI card is written."""

    update_interval: float  # seconds between two intermediate updates of one card
    update_min_chars: int  # fewer new characters than this wait for the next interval
    qps: float  # card calls per second per app and API


@dataclass(frozen=True)
class ConversationSettings:
    """What a message is, and how long its Dify conversation lasts."""

    remain_time: float  # minutes of inactivity before the context resets
    session_scope: str  # in groups: per `user` or one per `chat`
    command_prefix: str
    max_message_chars: int  # longer messages are refused with a clear reply
    default_image_query: str  # what is asked for a picture sent without text
    default_file_query: str  # ... and for a file or video sent without text

    @property
    def ttl(self) -> float:
        """`remain_time` in seconds."""
        return self.remain_time * 60.0


@dataclass(frozen=True)
class AccessSettings:
    """Who the bot answers."""

    allow_users: tuple[str, ...] | None  # None: everyone
    allow_groups: tuple[str, ...] | None  # None: every group
    deny_users: tuple[str, ...]
    deny_groups: tuple[str, ...]
    denied_reply: str  # "": refuse silently


@dataclass(frozen=True)
class PresentationSettings:
    """How an answer looks in DingTalk."""

    show_progress: bool  # tool calls and workflow steps shown until the answer starts
    show_suggested_questions: bool
    suggested_questions_timeout: float  # the final answer waits at most this long for them
    show_reasoning: str  # hide | quote
    markdown_tables: str  # list | code | keep
    image_delivery: str  # card | message


@dataclass(frozen=True)
class RouteConfig:
    """Messages from these DingTalk conversations go to another Dify app (own client, own contexts)."""

    name: str
    conversation_ids: tuple[str, ...]
    app_type: str
    api_key: Secret
    url: str  # the bot's unless the route names another Dify
    input_variable: str | None  # the bot's unless the route says


@dataclass(frozen=True)
class BotConfig:
    """One robot: a DingTalk app bound to a Dify app."""

    name: str
    dingtalk: DingTalkSettings
    dify: DifySettings
    cards: CardSettings
    conversation: ConversationSettings
    access: AccessSettings
    presentation: PresentationSettings
    state_dir: str
    store: str  # disk, or a redis:// URL
    log_level: str
    routes: tuple[RouteConfig, ...]


@dataclass(frozen=True)
class DaemonConfig:
    path: str
    bots: tuple[BotConfig, ...]
    log_level: str  # the top level's: the supervisor's
    stop_timeout: float  # graceful stop: how long in-flight answers may take to finish
    heartbeat_timeout: float  # a child whose loop is silent this long is replaced
    restart_delay_min: float  # back-off before restarting a crashed bot process, doubling per crash
    restart_delay_max: float
    start_timeout: float  # READY=1 at the latest this long after the start (or a reload)
    metrics_listen: str | None  # HOST:PORT or unix:/PATH: the Prometheus endpoint; None: off
    status_socket: str | None  # None: $RUNTIME_DIRECTORY/status.sock (paths.py); "off": none
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def bot(self, name: str) -> BotConfig:
        for bot in self.bots:
            if bot.name == name:
                return bot
        raise KeyError(name)


T = TypeVar("T", bound="DataclassInstance")


def assemble(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """An instance of the dataclass `cls` from values keyed by their place (`dify.timeouts.connect`): a field
    whose type is a dataclass is assembled from the values under its name."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for part in dataclasses.fields(cls):
        place = prefix + part.name
        if dataclasses.is_dataclass(hints[part.name]):
            kwargs[part.name] = assemble(hints[part.name], values, place + ".")
        elif place in values:
            kwargs[part.name] = values[place]
    return cls(**kwargs)


def get_at(obj: Any, place: str) -> Any:
    """The value at `place` (`dify.api_key`) in a configuration object."""
    for name in place.split("."):
        obj = getattr(obj, name)
    return obj


def replace_at(obj: T, place: str, value: Any) -> T:
    """A copy of `obj` with the value at `place` replaced (frozen parts are copied along the way)."""
    name, _, rest = place.partition(".")
    new = replace_at(getattr(obj, name), rest, value) if rest else value
    return dataclasses.replace(obj, **{name: new})
