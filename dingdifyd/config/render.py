"""`check-config`'s output: the effective configuration as YAML, under the keys an admin writes, secrets masked.

Flat keys, as in the file (not the model's groups): what is printed can be pasted back into a file. Every
bot lists every setting, inherited or not; a store URL shows no password and a secret only where it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from dingdifyd.config.model import BotConfig, DaemonConfig, RouteConfig, get_at
from dingdifyd.config.secret import Secret, redact_url
from dingdifyd.config.settings import Kind, Scope, in_scope, route_settings

_DAEMON = tuple(s for s in in_scope(Scope.DAEMON) if s.at)
_BOT = tuple(s for s in in_scope(Scope.BOT_ONLY, Scope.BOT) if s.at and s.kind is not Kind.ROUTES)
_ROUTE = route_settings()


def masked(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        return redact_url(value)  # a store URL with a password, in its user part or its query
    if isinstance(value, Secret):
        return f"**** ({value.source})"
    if isinstance(value, tuple):
        return [masked(item) for item in value]
    if isinstance(value, RouteConfig):
        return {s.key: masked(get_at(value, s.route_at)) for s in _ROUTE}
    return value


def effective_bot(bot: BotConfig, reveal: Callable[[Any], Any] = masked) -> dict[str, Any]:
    """A bot's every setting under its YAML key, its routes last."""
    return {**{s.key: reveal(get_at(bot, str(s.at))) for s in _BOT}, "routes": reveal(bot.routes)}


def render_effective(config: DaemonConfig, reveal: Callable[[Any], Any] = masked) -> str:
    """The effective configuration as YAML, secrets masked: what `check-config` prints."""
    doc = {
        "log_level": config.log_level,
        **{s.key: reveal(getattr(config, str(s.at))) for s in _DAEMON},
        "bots": [effective_bot(bot, reveal) for bot in config.bots],
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
