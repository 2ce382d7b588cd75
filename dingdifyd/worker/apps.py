"""A bot's Dify apps, built and checked before the bot takes messages: its own app and one per route.

Used by the bot process (a wrong key or app type ends it with exit 78 and the key path to fix) and by
`dingdifyd doctor`.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from dingdifyd.bridge.apps import AppRouter
from dingdifyd.bridge.ports import AnswerSource
from dingdifyd.config import BotConfig, DaemonConfig, RouteConfig
from dingdifyd.dify.apptype import check_at_start
from dingdifyd.dify.client import DifyClient


def key_path(daemon: DaemonConfig, bot: BotConfig) -> str:
    """How the config file names the bot: `bots[2]`."""
    index = next((i for i, b in enumerate(daemon.bots) if b.name == bot.name), None)
    return f"bots[{index}]" if index is not None else f"bot {bot.name}"


def dify_session() -> aiohttp.ClientSession:
    """The HTTP session for Dify: no cap on connections, since every answer in flight holds one for its whole
    stream (aiohttp's default cap of 100 would queue the 101st conversation, and time it out)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def bot_client(bot: BotConfig, http: aiohttp.ClientSession) -> DifyClient:
    return DifyClient(
        base_url=bot.dify.url, api_key=bot.dify.api_key, app_type=bot.dify.app_type,
        session=http, input_variable=bot.dify.input_variable, timeouts=bot.dify.timeouts,
        files_url=bot.dify.files_url,
    )  # fmt: skip


def route_client(bot: BotConfig, route: RouteConfig, http: aiohttp.ClientSession) -> DifyClient:
    return DifyClient(
        base_url=route.url, api_key=route.api_key, app_type=route.app_type,
        session=http, input_variable=route.input_variable, timeouts=bot.dify.timeouts,
    )  # fmt: skip


async def start_apps(
    bot: BotConfig,
    client: DifyClient,
    http: aiohttp.ClientSession,
    *,
    where: str,
    guard: Callable[[DifyClient], AnswerSource] | None = None,
) -> AppRouter:
    """The bot's router over `client` and its routes' apps, each checked (key accepted, app type right,
    `auto` resolved); `guard` wraps each app's answer streams. Raises ConfigError naming every key to fix."""
    clients = [client]  # as the router's apps come: the bot's own, then one per route

    def client_of(route: RouteConfig) -> DifyClient:
        clients.append(route_client(bot, route, http))
        return clients[-1]

    router = AppRouter.from_config(
        bot, client, client_of, where=where, answers=guard(client) if guard else None, guard=guard,
    )  # fmt: skip
    await check_at_start([(app.config_key, made) for app, made in zip(router.apps, clients, strict=True)])
    return router
