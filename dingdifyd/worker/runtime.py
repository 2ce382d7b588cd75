"""One bot's process: its event loop, its connections and its store, opened after fork.

`bot_process_main` is what the supervisor forks into; `BotRuntime` is the asyncio part, also run in-process by
tests. Exit codes: 0 after a graceful stop, 78 when DingTalk or Dify refuse the bot's credentials (restarting
would not help), anything else is a crash the supervisor restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypedDict, TypeVar

import aiohttp

from dingdifyd.bridge.report import AnswerReport
from dingdifyd.bridge.service import BridgeService
from dingdifyd.config import BotConfig, DaemonConfig
from dingdifyd.dify.client import DifyClient
from dingdifyd.dify.guarded import GuardedAnswers
from dingdifyd.dify.protected import DifyProtections, ProtectedAnswers, ProtectionSettings
from dingdifyd.dingtalk.accounting import ApiAccounting
from dingdifyd.dingtalk.api import DingTalkApi
from dingdifyd.dingtalk.files import DingTalkFiles
from dingdifyd.dingtalk.replies import DingTalkReplies
from dingdifyd.dingtalk.stream import StreamConnection
from dingdifyd.errors import EX_CONFIG, EX_OK, DifyAuthError, DingTalkAuthError
from dingdifyd.models import IncomingMessage
from dingdifyd.pacing.scheduler import CardScheduler
from dingdifyd.store import open_store
from dingdifyd.store.base import Store
from dingdifyd.worker.adoption import tend_shared_store
from dingdifyd.worker.apps import bot_client, dify_session, key_path, start_apps
from dingdifyd.worker.delivery_watch import LATE_AFTER, DeliveryWatch
from dingdifyd.worker.heartbeat import ParentChannel, heartbeat_interval, heartbeat_loop
from dingdifyd.worker.stats import BotStats, ErrorCountingStore

log = logging.getLogger(__name__)

T = TypeVar("T")

RECOVERY_RETRY = 5.0  # seconds between two looks at the answers left unfinished, when the store failed at start


class CardBackoff(TypedDict, total=False):
    """The card scheduler's back-off (CardScheduler's keywords of these names), which tests shorten."""

    hold_base: float
    hold_cap: float
    retry_base: float
    retry_cap: float


class BotRuntime:
    def __init__(
        self,
        bot: BotConfig,
        daemon: DaemonConfig,
        channel: ParentChannel | None = None,
        *,
        late_delivery_after: float = LATE_AFTER,
        card_backoff: CardBackoff | None = None,
        stats: BotStats | None = None,
        store: Store | None = None,
        bridge_options: dict[str, Any] | None = None,
        dify_protection: dict[str, Any] | None = None,
    ):
        """Test knobs: `card_backoff`, the card scheduler's hold_base / retry_base ... (tests shorten
        DingTalk's 1 s); `store`, a store opened beforehand (e.g. with a short lease) instead of the bot's
        own; `bridge_options`, more BridgeService settings (e.g. store_outage_notice_after); `dify_protection`,
        ProtectionSettings fields (e.g. a shorter circuit cool-down)."""
        self.bot = bot
        self.daemon = daemon
        self.channel = channel
        self.bridge: BridgeService | None = None
        self.connection: StreamConnection | None = None
        self.store: Store | None = store
        self._bridge_options = bridge_options or {}
        self._dify_protection = dify_protection or {}
        self.accounting: ApiAccounting | None = None
        self.scheduler: CardScheduler | None = None
        self.protections: DifyProtections | None = None
        self._card_backoff: CardBackoff = card_backoff or {}
        self.delivery_watch = DeliveryWatch(bot.dingtalk.client_id, late_after=late_delivery_after)
        self.stats = stats if stats is not None else BotStats()  # what `dingdifyd status` and the metrics show
        self._stop = asyncio.Event()
        self._report_soon = asyncio.Event()  # an answer ended: the supervisor hears of it before the next beat
        self.connected = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def _on_message(self, message: IncomingMessage) -> bool:
        """Whether to ACK the message's frame: not when the store could not claim it (DingTalk redelivers)."""
        assert self.bridge is not None
        if not self.bridge.not_taken_before(message):  # else it is late because we did not ACK it: no stranger
            self.delivery_watch.observe(message)
        return self.bridge.submit(message).ack

    def _on_state(self, state: str) -> None:
        self.stats.connection(state)
        if state == "connected":
            self.delivery_watch.connected()
            self.connected.set()
            if self.channel:
                self.channel.connected()
        elif state == "disconnected":
            self.delivery_watch.disconnected()
            self.connected.clear()
            if self.channel:
                self.channel.disconnected()

    async def run(self) -> int:
        # heartbeats from the first moment: checking the Dify apps may take a while, and a silent bot is killed
        beats = self._start_heartbeats()
        try:
            return await self._run(beats)
        finally:
            if beats is not None:
                beats.cancel()

    def _start_heartbeats(self) -> asyncio.Task[None] | None:
        if self.channel is None:
            return None
        interval = heartbeat_interval(self.daemon.heartbeat_timeout)
        return asyncio.create_task(
            heartbeat_loop(
                self.channel, interval,
                lambda: self.bridge.in_flight if self.bridge is not None else 0,
                self.report,
                self._report_soon,
            ),
            name="heartbeats",
        )  # fmt: skip

    async def _until_stopped(self, step: Awaitable[T], beats: asyncio.Task[None] | None) -> T | None:
        """`step`'s result, or None when a stop is requested (or the supervisor goes away) first."""
        task = asyncio.ensure_future(step)
        stop = asyncio.create_task(self._stop.wait())
        watched: set[asyncio.Future[Any]] = {task, stop, *([beats] if beats is not None else [])}
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _run(self, beats: asyncio.Task[None] | None) -> int:
        bot = self.bot
        store = self.store = ErrorCountingStore(self.store or open_store(bot.store, bot.state_dir, bot.name),
                                                self.stats.store_error)
        self.stats.attach_store(store)
        try:
            # two sessions: long Dify streams must never hold up DingTalk's short calls (cards, files)
            async with aiohttp.ClientSession() as http, dify_session() as dify_http:
                # every DingTalk call counted (per day and month, in the store); card calls share one scheduler
                accounting = self.accounting = ApiAccounting(store, monthly_budget=bot.dingtalk.monthly_budget)
                api = DingTalkApi(
                    client_id=bot.dingtalk.client_id, client_secret=bot.dingtalk.client_secret,
                    session=http, api_base=bot.dingtalk.api_base, oapi_base=bot.dingtalk.oapi_base,
                    timeout=bot.dingtalk.timeout, on_call=accounting.record, on_result=self.stats.dingtalk_call,
                )  # fmt: skip
                scheduler = self.scheduler = CardScheduler(
                    bot.cards.qps, pacing=accounting.pacing, **self._card_backoff
                )
                # each Dify protected from bursts: a bound on answers in flight shared through the store's slot
                # table, a fair queue, one retry, a circuit breaker (dify/protected.py)
                protections = self.protections = DifyProtections(
                    store.dify_slots(),
                    ProtectionSettings(max_concurrency=bot.dify.max_concurrency, **self._dify_protection),
                )

                def guard(client: DifyClient) -> ProtectedAnswers:
                    return ProtectedAnswers(GuardedAnswers(client), protections.for_url(client.base_url))

                # the bot's Dify apps (its own, its routes'), checked before any message is taken: exit 78 when
                # wrong; a stop request (SIGTERM) is heeded meanwhile
                apps = await self._until_stopped(start_apps(
                    bot, bot_client(bot, dify_http), dify_http, where=key_path(self.daemon, bot), guard=guard
                ), beats)  # fmt: skip
                if apps is None:
                    log.info("stopped while starting")
                    return EX_OK
                self.bridge = BridgeService(
                    bot=bot, store=store, apps=apps, replies=DingTalkReplies(api, bot.dingtalk.card_template_id),
                    files=DingTalkFiles(api), scheduler=scheduler, on_answer=self._answered,
                    **self._bridge_options,
                )  # fmt: skip
                self.connection = StreamConnection(
                    client_id=bot.dingtalk.client_id, client_secret=bot.dingtalk.client_secret,
                    api_base=bot.dingtalk.api_base, session=http, on_message=self._on_message,
                    on_state=self._on_state, on_failure=self.channel.problem if self.channel else lambda _: None,
                )  # fmt: skip
                return await self._serve(beats)
        finally:
            if self.protections is not None:
                self.protections.close()
            store.close()

    def _answered(self, report: AnswerReport) -> None:
        self.stats.answer(report)
        self._report_soon.set()

    def report(self) -> dict[str, Any]:
        """What goes to the supervisor with each heartbeat: counts, live status, metrics (worker/stats.py)."""
        accounting, scheduler = self.accounting, self.scheduler
        return self.stats.report(
            in_flight=self.bridge.in_flight if self.bridge is not None else 0,
            # waiting for a card call, and waiting for a turn at the Dify (dify_max_concurrency)
            queued=(len(scheduler.policy) if scheduler is not None else 0)
            + (self.protections.waiting if self.protections is not None else 0),
            calls=accounting.stats() if accounting is not None else None,
            budget=self.bot.dingtalk.monthly_budget,
            pacing=accounting.pacing().level if accounting is not None else "normal",
        )  # fmt: skip

    async def _serve(self, beats: asyncio.Task[None] | None) -> int:
        assert self.bridge is not None and self.connection is not None and self.store is not None
        bridge = self.bridge
        resumed = bridge.recover()
        if resumed:
            log.warning("resuming %d answers an earlier process did not finish", resumed)
        self.delivery_watch.started(shared_store=self.store.shared)
        if self.store.shared:
            # renew this process's lease (also while stopping), adopt the answers of processes that are gone,
            # and hand ours over before the lease lapses when it cannot be renewed
            adopt = lambda: 0 if self._stop.is_set() else bridge.recover()  # noqa: E731
            tending = asyncio.create_task(
                tend_shared_store(self.store, adopt, hand_over=bridge.hand_over), name="shared-store"
            )
        else:
            # the answers left unfinished could not be listed at start (the store failed): look again later
            tending = asyncio.create_task(_retry_recovery(bridge), name="recovery")
        stream = asyncio.create_task(self.connection.run(), name="dingtalk-stream")
        stop = asyncio.create_task(self._stop.wait(), name="stop-request")
        watched = {stream, stop}
        if beats is not None:
            watched.add(beats)  # it returns when the supervisor is gone: an orphan stops too
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            failure = stream.exception() if stream.done() and not stream.cancelled() else None
            if failure is not None:
                raise failure
            log.info("stopping: no new messages; %d answers in flight", bridge.in_flight)
            # stop taking messages first, so that DingTalk delivers new ones to the next process
            await self.connection.close()
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stream
            await bridge.drain(self.daemon.stop_timeout)
            await bridge.ledger.aclose()
            if self.accounting is not None:
                self.accounting.flush()
            log.info("stopped (%d answered, %d failed)", bridge.answered, bridge.failed)
            return EX_OK
        except (DingTalkAuthError, DifyAuthError) as exc:
            log.error("credentials refused: %s; fix the bot's configuration (not restarting)", exc)
            return EX_CONFIG
        finally:
            for task in (stream, stop, tending):
                task.cancel()


async def _retry_recovery(bridge: BridgeService, every: float = RECOVERY_RETRY) -> None:
    while True:
        await asyncio.sleep(every)
        if bridge.retry_recovery():
            log.warning("resumed the answers an earlier process did not finish, now that the store works")
