"""The Dify apps of one bot, and which one answers a message.

A bot has its own Dify app and, optionally, `routes`: messages from the conversations a route lists go to that
route's app instead. Each app has its own client, its own cached settings (`GET /parameters`, refreshed every
few minutes) and its own contexts: the session keys of a route carry its name, so a conversation id of one app
is never sent to another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from dingdifyd.apptypes import CHAT_APP_TYPES
from dingdifyd.bridge import session
from dingdifyd.bridge.inputs import AppParameters, context_inputs, text_input_variable
from dingdifyd.bridge.ports import AnswerSource
from dingdifyd.config import BotConfig, RouteConfig
from dingdifyd.errors import PeerError, brief
from dingdifyd.logs.setup import register_secret
from dingdifyd.models import IncomingMessage

log = logging.getLogger(__name__)

PARAMETERS_TTL = 300.0  # an app builder's change of the input form is picked up within five minutes
PARAMETERS_RETRY = 30.0  # after a failed fetch: answers go on with what is known, and ask again later
PARAMETERS_TIMEOUT = 5.0  # an answer never waits longer than this for the app's settings


class DifyAppClient(AnswerSource, Protocol):
    """What the bridge needs of a Dify app's client (dingdifyd.dify.client.DifyClient provides it): its answer
    streams, and these."""

    app_type: str
    input_variable: str

    async def stop(self, task_id: str, user: str) -> None: ...
    async def parameters(self) -> dict[str, Any]: ...
    async def suggested_questions(self, message_id: str, user: str) -> list[str]: ...
    async def form(self, token: str) -> dict[str, Any]: ...
    async def submit_form(self, token: str, *, action: str, inputs: dict[str, Any], user: str) -> None: ...


class ParametersCache:
    """`GET /parameters` at most once per `ttl` per process. A failure keeps the last good answer and is retried
    after `retry_after`, so a Dify that cannot say its settings slows no answer down more than once."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[dict[str, Any]]],
        *,
        ttl: float = PARAMETERS_TTL,
        retry_after: float = PARAMETERS_RETRY,
        timeout: float = PARAMETERS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch = fetch
        self._ttl = ttl
        self._retry_after = retry_after
        self._timeout = timeout
        self._clock = clock
        self._value: AppParameters | None = None
        self._next_fetch = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self) -> AppParameters | None:
        if self._clock() < self._next_fetch:
            return self._value
        async with self._lock:  # concurrent answers share one fetch
            if self._clock() < self._next_fetch:
                return self._value
            try:
                async with asyncio.timeout(self._timeout):
                    raw = await self._fetch()
                self._value = AppParameters.parse(raw)
                self._next_fetch = self._clock() + self._ttl
            except (PeerError, TimeoutError) as exc:
                log.warning("could not read the Dify app's settings (GET /parameters): %s", brief(exc))
                self._next_fetch = self._clock() + self._retry_after
        return self._value


class DifyApp:
    """One Dify app as the bridge uses it."""

    def __init__(
        self,
        *,
        client: DifyAppClient,
        answers: AnswerSource | None = None,
        namespace: str,
        config_key: str,
        name: str = "",
        conversation_ids: Iterable[str] = (),
        input_variable: str | None = None,
        context_mapping: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client  # settings, stop, suggestions; its attributes are the app's (app_type, input_variable)
        self.answers = answers or client  # the answer streams: the client, or a guard around it
        self.namespace = namespace  # the "bot" part of session keys
        self.config_key = config_key  # e.g. bots[0] or bots[0].routes[1]: how errors name it
        self.name = name  # "" for the bot's own app
        self.conversation_ids = frozenset(conversation_ids)
        self.explicit_input_variable = input_variable
        self.context_mapping = dict(context_mapping or {})
        self.settings = ParametersCache(client.parameters, clock=clock)

    def __repr__(self) -> str:
        return f"DifyApp({self.config_key})"

    def session_key(self, message: IncomingMessage, scope: str) -> str:
        return session.session_key(self.namespace, message, scope)

    async def inputs_for(self, message: IncomingMessage) -> dict[str, Any]:
        """The request's `inputs`; also points the client at the app's text input (workflow / completion)."""
        params = await self.settings.get()
        self.client.input_variable = text_input_variable(params, self.explicit_input_variable, self.context_mapping)
        return context_inputs(message, self.context_mapping, params)

    async def suggested_questions(self, message_id: str, user: str, timeout: float) -> list[str]:
        """Follow-up questions for an answer when the app offers them; [] when not, or not within `timeout`."""
        if self.client.app_type not in CHAT_APP_TYPES or not message_id or timeout <= 0:
            return []
        try:
            async with asyncio.timeout(timeout):
                params = await self.settings.get()
                if params is None or not params.suggested_after_answer:
                    return []
                return await self.client.suggested_questions(message_id, user)
        except (PeerError, TimeoutError) as exc:
            log.info("no suggested questions for message %s: %s", message_id, brief(exc))
            return []


class AppRouter:
    """Picks the app for a message: the route listing its conversation, else the bot's own app."""

    def __init__(self, default: DifyApp, routes: Sequence[DifyApp] = ()):
        self.default = default
        self.routes = tuple(routes)
        self._by_conversation = {cid: app for app in self.routes for cid in app.conversation_ids}

    @classmethod
    def from_config(
        cls,
        bot: BotConfig,
        client: DifyAppClient,
        make_client: Callable[[RouteConfig], DifyAppClient] | None = None,
        *,
        where: str = "bot",
        answers: AnswerSource | None = None,
        guard: Callable[[Any], AnswerSource] | None = None,
    ) -> AppRouter:
        """The bot's app around `client`, and one app per route with a client from `make_client` (without one,
        e.g. in the terminal chat, the routes are left out and the bot's app answers everything). `answers` is
        what streams the bot's app's answers (default: `client`); `guard` wraps each route's client likewise."""
        mapping = bot.dify.inputs
        default = DifyApp(
            client=client, answers=answers, namespace=bot.name, config_key=where,
            input_variable=bot.dify.input_variable, context_mapping=mapping,
        )  # fmt: skip
        routes = []
        for index, route in enumerate(bot.routes if make_client is not None else ()):
            assert make_client is not None
            register_secret(route.api_key)  # never in a log line, like the bot's own key
            route_client = make_client(route)
            app = DifyApp(
                client=route_client, answers=guard(route_client) if guard else None,
                namespace=f"{bot.name}#{route.name}", config_key=f"{where}.routes[{index}]",
                name=route.name, conversation_ids=route.conversation_ids,
                input_variable=route.input_variable, context_mapping=mapping,
            )  # fmt: skip
            routes.append(app)
        return cls(default, routes)

    @property
    def apps(self) -> tuple[DifyApp, ...]:
        return (self.default, *self.routes)

    def route_for(self, message: IncomingMessage) -> DifyApp:
        return self._by_conversation.get(message.conversation_id, self.default)
