"""Loading: read the YAML, take each setting of the table from where it is written, check it, resolve secrets.

A bot's setting comes from the bot, else the file's top level (every bot's default), else the environment's
name for it (dify-on-dingtalk's `.env`), else the table's default. Every problem is collected and reported at
once, each named by its key path (`bots[1].dify_app_api_key: missing`), a bad inherited value where it is
written (in the bot, or at the top level), so an admin fixes a file in one round.

Secrets: the supervisor keeps every secret sealed (`sealed`); each bot process reads again its own bot's, and
no other (`unseal_bot`), so that no process holds another bot's secrets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dingdifyd.config.model import BotConfig, DaemonConfig, RouteConfig, assemble, get_at, replace_at
from dingdifyd.config.readers import Problem, from_env, is_unset, read
from dingdifyd.config.secret import Secret
from dingdifyd.config.settings import (
    BOT_KEYS,
    ROUTE_KEYS,
    TOP_LEVEL_KEYS,
    Kind,
    Scope,
    Setting,
    in_scope,
    route_settings,
    setting,
)
from dingdifyd.errors import ConfigError

DAEMON_GROUP = "dingdifyd"  # the packaged units' account (User=/Group=dingdifyd), which must read the file
_TOP = in_scope(Scope.BOT)  # may stand at the top level, as every bot's default
_DAEMON = in_scope(Scope.DAEMON)
_BOT_ONLY = in_scope(Scope.BOT_ONLY)
_ROUTE = route_settings()
_CONVERSATION_IDS = setting("conversation_ids", Scope.ROUTE)
_STRUCTURE = (Kind.NAME, Kind.ROUTES, Kind.IGNORED)  # read by the loader itself, or not at all


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

    def at(self, key: str) -> Problem:
        """Records a problem of the value at key path `key` (or of `sub` inside it)."""
        return lambda message, sub="": self.problem(f"{key}.{sub}" if sub else key, message)

    def build(self, raw: Any) -> DaemonConfig:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"{self.path}: the top level must be a mapping with a `bots:` list"])
        self.warn_unknown("", raw, TOP_LEVEL_KEYS)
        top = {s.key: self.top_level(s, raw) for s in _TOP}
        daemon = {s.at: self.value(s, raw, "") for s in _DAEMON if s.at}
        if daemon["restart_delay_max"] < daemon["restart_delay_min"]:
            self.problem("restart_delay_max", "must be >= restart_delay_min")
        bots = self.bots(raw.get("bots"), top)
        return DaemonConfig(
            path=self.path, bots=bots, log_level=top["log_level"], warnings=tuple(self.warnings), **daemon
        )

    def top_level(self, s: Setting, raw: dict[str, Any]) -> Any:
        """The file's top-level value, else the environment's, else the default: every bot's default."""
        if s.key in raw:
            return read(s, raw[s.key], self.at(s.key))
        if s.env and self.environ.get(s.env, "") != "":
            return read(s, from_env(self.environ[s.env]), self.at(s.key))
        try:
            default = s.default_in(self.environ)
        except ValueError as exc:  # nothing says where the state is
            self.problem(s.key, str(exc))
            return ""
        return dict(default) if isinstance(default, dict) else default

    def value(self, s: Setting, raw: dict[str, Any], where: str, credential: str = "") -> Any:
        """A setting written in `raw` (the top level, a bot or a route at `where`), else its default."""
        if s.secret:
            return self.secret(where, credential, s.key, raw)
        if s.key not in raw and not s.required:
            return s.default
        return read(s, raw.get(s.key), self.at(f"{where}.{s.key}" if where else s.key))

    def bots(self, raw: Any, top: dict[str, Any]) -> tuple[BotConfig, ...]:
        if raw is None:
            self.problem("bots", "missing (a list of robots)")
            return ()
        if not isinstance(raw, list) or not raw:
            self.problem("bots", "must be a non-empty list of robots")
            return ()
        bots = [(index, self.bot(f"bots[{index}]", item, top)) for index, item in enumerate(raw)]
        seen: dict[str, int] = {}
        for index, bot in bots:
            if bot is not None and bot.name in seen:
                self.problem(f"bots[{index}].name", f"duplicate of bots[{seen[bot.name]}].name ({bot.name!r})")
            if bot is not None:
                seen.setdefault(bot.name, index)
        return tuple(bot for _, bot in bots if bot is not None)

    def bot(self, where: str, raw: Any, top: dict[str, Any]) -> BotConfig | None:
        if not isinstance(raw, dict):
            self.problem(where, "must be a mapping (name, dingtalk_app_client_id, ...)")
            return None
        self.warn_unknown(where, raw, BOT_KEYS)
        name = self._bot_name = self.bot_name(where, raw)
        values: dict[str, Any] = {"name": name}
        for s in _TOP:
            values[str(s.at)] = read(s, raw[s.key], self.at(f"{where}.{s.key}")) if s.key in raw else top[s.key]
        for s in _BOT_ONLY:
            if s.kind not in _STRUCTURE:
                values[str(s.at)] = self.value(s, raw, where, credential=name)
        values["routes"] = self.routes(where, name, raw.get("routes"), values)
        if any(values[str(s.at)] is None for s in _BOT_ONLY if s.secret):
            return None
        return assemble(BotConfig, values)

    def bot_name(self, where: str, raw: dict[str, Any]) -> str:
        name = raw.get("name")
        if name is None or str(name).strip() == "":
            self.problem(f"{where}.name", "missing")
            name = f"bot{where[5:-1]}"
        name = str(name).strip()
        if "/" in name or name.startswith(".") or "\0" in name:
            self.problem(f"{where}.name", "must not contain '/' or start with '.' (it names a state directory)")
        return name

    def routes(self, where: str, bot_name: str, raw: Any, bot: dict[str, Any]) -> tuple[RouteConfig, ...]:
        """`routes:`: per-conversation Dify apps. Each conversation id may be routed once."""
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.problem(f"{where}.routes", "must be a list of {conversation_ids, dify_app_api_key, dify_app_type}")
            return ()
        routes: list[RouteConfig] = []
        routed: dict[str, str] = {}  # conversation id -> the route that has it
        for index, item in enumerate(raw):
            route = self.route(f"{where}.routes[{index}]", index, item, bot_name, bot, routes, routed)
            if route is not None:
                routes.append(route)
        return tuple(routes)

    def route(
        self, at: str, index: int, item: Any, bot_name: str, bot: dict[str, Any],
        routes: list[RouteConfig], routed: dict[str, str],
    ) -> RouteConfig | None:  # fmt: skip
        """One route; what it does not set of the bot's Dify keys is the bot's."""
        if not isinstance(item, dict):
            self.problem(at, "must be a mapping (conversation_ids, dify_app_api_key, dify_app_type)")
            return None
        self.warn_unknown(at, item, ROUTE_KEYS)
        name = str(item.get("name") or f"route{index}").strip()
        if not name.replace("-", "").replace("_", "").isalnum():
            self.problem(f"{at}.name", "letters, digits, '-' and '_' only (it names the route's contexts)")
        if any(route.name == name for route in routes):
            self.problem(f"{at}.name", f"duplicate route name {name!r}")
        ids = read(_CONVERSATION_IDS, item.get("conversation_ids"), self.at(f"{at}.conversation_ids"))
        if not ids:
            self.problem(f"{at}.conversation_ids", "missing (a list of DingTalk conversation ids, cid...==)")
        for conversation_id in ids or ():
            if conversation_id in routed:
                self.problem(f"{at}.conversation_ids", f"{conversation_id} is already in {routed[conversation_id]}")
            routed.setdefault(conversation_id, at)
        values: dict[str, Any] = {"name": name, "conversation_ids": ids or ()}
        for s in _ROUTE:
            if s.in_routes and (s.required or not is_unset(item.get(s.key))):
                # a route's key as a systemd credential: <bot>.<route>.dify_app_api_key
                values[s.route_at] = self.value(s, item, at, credential=f"{bot_name}.{name}")
            elif s.in_routes:
                values[s.route_at] = bot[str(s.at)]
        if any(values[s.route_at] is None for s in _ROUTE if s.secret):
            return None
        return assemble(RouteConfig, values)

    def warn_unknown(self, where: str, raw: dict[str, Any], known: frozenset[str]) -> None:
        for key in raw:
            if key not in known:
                path = f"{where}.{key}" if where else str(key)
                self.warnings.append(f"{path}: unknown key, ignored")

    def secret(self, where: str, owner: str, key: str, raw: dict[str, Any]) -> Secret | None:
        """Inline value, `<key>_file`, or the systemd credential `<owner>.<key>`, in that order."""
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
            candidate = Path(cred_dir) / f"{owner}.{key}"
            try:
                present = candidate.exists()
            except OSError:  # an unreadable credentials directory: let read_secret name the problem
                present = True
            if present:
                return self.read_secret(f"{where}.{key}", candidate, "systemd credential")
        hint = f" (inline, {file_key}, or the systemd credential {owner}.{key})"
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


def _daemon_gids() -> set[int]:
    gids = {os.getegid()}
    with contextlib.suppress(KeyError):
        gids.add(grp.getgrnam(DAEMON_GROUP).gr_gid)
    return gids


_BOT_SECRETS = tuple(s for s in _BOT_ONLY if s.secret)
_ROUTE_SECRETS = tuple(s for s in _ROUTE if s.secret)


def bot_secrets(bot: BotConfig) -> list[Secret]:
    """Every secret of a bot: its own and its routes'."""
    own = [get_at(bot, str(s.at)) for s in _BOT_SECRETS]
    return [*own, *(get_at(route, s.route_at) for route in bot.routes for s in _ROUTE_SECRETS)]


def sealed(config: DaemonConfig) -> DaemonConfig:
    """The configuration with every secret sealed: what the supervisor keeps (see Secret)."""
    return dataclasses.replace(config, bots=tuple(_sealed_bot(bot) for bot in config.bots))


def _sealed_bot(bot: BotConfig) -> BotConfig:
    def own(place: str) -> Secret:
        secret: Secret = get_at(bot, place)
        return secret.sealed()

    return _with_secrets(bot, own, lambda route, place: get_at(route, place).sealed())


def unseal_bot(path: str | os.PathLike[str], bot: BotConfig, environ: Mapping[str, str] | None = None) -> BotConfig:
    """`bot` (as the supervisor knows it, sealed) with its own secrets read again from the file, files and
    credentials, and no other bot's: what its process runs with. Raises ConfigError."""
    fresh = load(path, environ, secrets_of=bot.name)
    try:
        mine = fresh.bot(bot.name)
    except KeyError:
        raise ConfigError([f"bots: {bot.name!r} is no longer in {path}; reload the configuration"]) from None
    routes_now = {route.name: route for route in mine.routes}
    for route in bot.routes:
        if route.name not in routes_now:
            raise ConfigError([f"{bot.name}.routes: {route.name!r} is no longer in {path}; reload the configuration"])
    return _with_secrets(
        bot, lambda place: get_at(mine, place), lambda route, place: get_at(routes_now[route.name], place)
    )


def _with_secrets(
    bot: BotConfig, own: Callable[[str], Secret], of_route: Callable[[RouteConfig, str], Secret]
) -> BotConfig:
    """`bot` with each secret replaced: its own by `own(place)`, its routes' by `of_route(route, place)`."""
    for s in _BOT_SECRETS:
        bot = replace_at(bot, str(s.at), own(str(s.at)))
    routes = []
    for route in bot.routes:
        for s in _ROUTE_SECRETS:
            route = replace_at(route, s.route_at, of_route(route, s.route_at))
        routes.append(route)
    return dataclasses.replace(bot, routes=tuple(routes))
