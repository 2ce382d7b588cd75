"""The bot's durable state: one interface (base.py), kept on disk (disk.py) or in Redis (redis_store.py)."""

from __future__ import annotations

from pathlib import Path

from dingdifyd.errors import ConfigError
from dingdifyd.store.base import REDIS_SCHEMES, Store


def open_store(url: str, state_dir: str, bot_name: str) -> Store:
    if url == "disk":
        from dingdifyd.store.disk import DiskStore

        return DiskStore(Path(state_dir) / bot_name)
    if url.startswith(REDIS_SCHEMES):
        try:
            from dingdifyd.store.redis_store import RedisStore
        except ImportError:
            needs = "store: a redis:// store needs the redis package: pip install 'dingdifyd[redis]'"
            raise ConfigError([needs]) from None
        return RedisStore(url, bot_name)
    raise ConfigError([f"store: {url.split(':', 1)[0]}:// stores are not available; use 'disk' or redis://"])
