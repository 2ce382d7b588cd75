"""Configuration: one table of settings (settings.py), read by a generic loader into small frozen parts.

The file is the original dify-on-dingtalk `.bots.yaml` shape, extended: top-level keys are the old `.env`
names in lower case and act as defaults for every bot, and a bot may override any of them. `load` reads and
checks a file (every problem named by its key path), `render_effective` is `check-config`'s output, and the
README's configuration table and dingdifyd.yaml(5) are generated from the same table (docs.py).
"""

from dingdifyd.config.loader import DAEMON_GROUP, bot_secrets, load, parse, sealed, unseal_bot
from dingdifyd.config.model import (
    AccessSettings,
    BotConfig,
    CardSettings,
    ConversationSettings,
    DaemonConfig,
    DifySettings,
    DifyTimeouts,
    DingTalkSettings,
    PresentationSettings,
    RouteConfig,
)
from dingdifyd.config.render import masked, render_effective
from dingdifyd.config.secret import SealedSecretError, Secret, redact_url, url_secrets
from dingdifyd.config.settings import DIFY_CONTEXT_INPUTS, SECRET_KEYS, SETTINGS, Setting
from dingdifyd.errors import ConfigError

__all__ = [
    "DAEMON_GROUP",
    "DIFY_CONTEXT_INPUTS",
    "SECRET_KEYS",
    "SETTINGS",
    "AccessSettings",
    "BotConfig",
    "CardSettings",
    "ConfigError",
    "ConversationSettings",
    "DaemonConfig",
    "DifySettings",
    "DifyTimeouts",
    "DingTalkSettings",
    "PresentationSettings",
    "RouteConfig",
    "SealedSecretError",
    "Secret",
    "Setting",
    "bot_secrets",
    "load",
    "masked",
    "parse",
    "redact_url",
    "render_effective",
    "sealed",
    "unseal_bot",
    "url_secrets",
]
