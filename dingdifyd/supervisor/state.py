"""Per-bot restart policy: a pure state machine, supervisord-shaped, with exponential back-off.

`BotLifecycle` is told what happened (spawned, connected, heartbeat, exited(code), stop/restart requested)
and returns what to do (`Spawn`, `Terminate`, `Kill`, `ScheduleSpawn`); `tick()` fires whatever is due. It
reads the time from an injected clock and never touches a process: every rule is unit-tested without forking.

    STOPPED --start--> (Spawn) --spawned--> STARTING --connected--> RUNNING
    STARTING/RUNNING --exit 78--> FATAL                 (a config/credential error: retrying will not help)
    STARTING/RUNNING --other exit--> BACKOFF --due--> (Spawn)
    STARTING/RUNNING --silent for heartbeat_timeout--> STOPPING(replace) --exit--> BACKOFF
    STARTING/RUNNING --stop/restart--> STOPPING --exit--> STOPPED / (Spawn)
    STOPPING --kill_at due--> (Kill)

A process that stayed up `stable_after` seconds before it ended starts its back-off from the minimum again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dingdifyd.errors import EX_CONFIG
from dingdifyd.pacing.backoff import Backoff


class Phase(enum.Enum):
    STARTING = "starting"  # process up, not connected to DingTalk (yet, or again)
    RUNNING = "running"  # connected
    BACKOFF = "backoff"  # ended; waiting to be started again
    STOPPING = "stopping"  # SIGTERM sent; waiting for it to end
    STOPPED = "stopped"  # not running, on purpose
    FATAL = "fatal"  # ended with EX_CONFIG; stays down until its config changes


LIVE_PHASES = (Phase.STARTING, Phase.RUNNING, Phase.STOPPING)


class StopIntent(enum.Enum):
    STOP = "stop"  # stop for good (shutdown, bot removed)
    RESTART = "restart"  # its config changed: start it again at once
    REPLACE = "replace"  # it stopped answering: a failure, restarted with back-off


@dataclass(frozen=True)
class Spawn:
    """Start a process for this bot now, then call `spawned()` (or `exited(None)` if that failed)."""


@dataclass(frozen=True)
class Terminate:
    """Send SIGTERM."""

    intent: StopIntent


@dataclass(frozen=True)
class Kill:
    """Send SIGKILL: it did not end within its grace period."""


@dataclass(frozen=True)
class ScheduleSpawn:
    """A restart is due at `at` (clock time), `delay` seconds from now; `tick()` returns `Spawn` then."""

    at: float
    delay: float


Action = Spawn | Terminate | Kill | ScheduleSpawn


class BotLifecycle:
    """The restart state of one bot. All times come from `clock` (monotonic seconds)."""

    def __init__(
        self,
        name: str,
        *,
        clock: Callable[[], float],
        backoff: Backoff,
        heartbeat_timeout: float,
        kill_grace: float,
        stable_after: float = 10.0,
    ):
        self.name = name
        self.clock = clock
        self.backoff = backoff
        self.heartbeat_timeout = heartbeat_timeout
        self.kill_grace = kill_grace  # SIGTERM -> SIGKILL for a process that stopped answering
        self.stable_after = stable_after
        self.phase = Phase.STOPPED
        self.intent: StopIntent | None = None
        self.started_at: float | None = None
        self.last_seen: float | None = None  # last message from the process: proof its event loop runs
        self.restart_at: float | None = None
        self.kill_at: float | None = None
        self.in_flight = 0
        self.dingtalk_calls_month = 0  # as last reported: kept across restarts (the child's store keeps it too)
        self.exit_code: int | None = None  # last exit: >= 0 a code, < 0 a signal, None: never ran / no start
        self.failures = 0  # unplanned ends since the process last ran stably
        self.problem: str | None = None  # why it is not connected, as the process or its exit says

    # --- events from the process ---------------------------------------------------------------------

    def spawned(self) -> None:
        now = self.clock()
        self.phase = Phase.STARTING
        self.intent = None
        self.started_at = self.last_seen = now
        self.restart_at = self.kill_at = None
        self.in_flight = 0

    def connected(self) -> None:
        self._seen()
        self.problem = None
        if self.phase is Phase.STARTING:
            self.phase = Phase.RUNNING

    def report_problem(self, text: str) -> None:
        """The process says why it cannot connect (it goes on trying)."""
        self._seen()
        self.problem = text

    def heartbeat(self, in_flight: int, stats: dict[str, object] | None = None) -> None:
        self._seen()
        if self.phase in LIVE_PHASES:
            self.in_flight = max(0, in_flight)
        calls = (stats or {}).get("dingtalk_calls_month")
        if isinstance(calls, int) and calls >= 0:
            self.dingtalk_calls_month = calls

    def disconnected(self) -> None:
        """The child lost its DingTalk connection and is reconnecting by itself."""
        self._seen()
        if self.phase is Phase.RUNNING:
            self.phase = Phase.STARTING

    def exited(self, code: int | None) -> list[Action]:
        """The process ended with `code` (negative: killed by that signal; None: it could not be started)."""
        now = self.clock()
        uptime = now - self.started_at if self.started_at is not None else 0.0
        intent, self.intent = self.intent, None
        self.exit_code = code
        self.in_flight = 0
        self.kill_at = None
        self.started_at = None
        if self.phase is Phase.STOPPING and intent is StopIntent.STOP:
            self.phase = Phase.STOPPED
            return []
        if self.phase is Phase.STOPPING and intent is StopIntent.RESTART:
            self.phase = Phase.STOPPED
            self.backoff.reset()
            self.failures = 0
            return [Spawn()]
        if self.phase not in LIVE_PHASES and code is not None:
            return []  # not ours to act on: already handled
        if code == EX_CONFIG:
            self.phase = Phase.FATAL
            return []
        if uptime >= self.stable_after:
            self.backoff.reset()
            self.failures = 0
        self.failures += 1
        delay = self.backoff.next_delay()
        self.phase = Phase.BACKOFF
        self.restart_at = now + delay
        return [ScheduleSpawn(at=self.restart_at, delay=delay)]

    # --- requests from the supervisor ----------------------------------------------------------------

    def start(self) -> list[Action]:
        """Run it (first start, or again after FATAL/STOPPED): at once, with a fresh back-off."""
        if self.phase in LIVE_PHASES:
            return []
        self.backoff.reset()
        self.failures = 0
        self.restart_at = None
        self.phase = Phase.STOPPED
        return [Spawn()]

    def stop(self, grace: float) -> list[Action]:
        """Stop for good: SIGTERM, SIGKILL after `grace` seconds."""
        if self.phase in (Phase.STARTING, Phase.RUNNING):
            return self._terminate(StopIntent.STOP, grace)
        if self.phase is Phase.STOPPING:
            self.intent = StopIntent.STOP
            return []
        self.phase = Phase.STOPPED
        self.restart_at = None
        return []

    def restart(self, grace: float) -> list[Action]:
        """Its configuration changed: stop it (SIGTERM, SIGKILL after `grace`) and start it again at once."""
        if self.phase in (Phase.STARTING, Phase.RUNNING):
            return self._terminate(StopIntent.RESTART, grace)
        if self.phase is Phase.STOPPING:
            self.intent = StopIntent.RESTART
            return []
        return self.start()

    def kill_now(self) -> list[Action]:
        """Impatient stop (a second SIGTERM): SIGKILL whatever runs."""
        if self.phase not in LIVE_PHASES:
            return self.stop(0.0)
        self.phase = Phase.STOPPING
        self.intent = StopIntent.STOP
        self.kill_at = None
        return [Kill()]

    # --- time ----------------------------------------------------------------------------------------

    def tick(self) -> list[Action]:
        """What is due now: a restart, a silent process to replace, an overdue SIGKILL."""
        now = self.clock()
        if self.phase is Phase.BACKOFF and self.restart_at is not None and now >= self.restart_at:
            return [Spawn()]
        if self.phase in (Phase.STARTING, Phase.RUNNING) and self.stale(now):
            return self._terminate(StopIntent.REPLACE, self.kill_grace)
        if self.phase is Phase.STOPPING and self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            return [Kill()]
        return []

    def next_deadline(self) -> float | None:
        """When `tick()` may next have something to do, if nothing else happens first."""
        if self.phase is Phase.BACKOFF:
            return self.restart_at
        if self.phase is Phase.STOPPING:
            return self.kill_at
        if self.phase in (Phase.STARTING, Phase.RUNNING) and self.last_seen is not None:
            return self.last_seen + self.heartbeat_timeout
        return None

    def stale(self, now: float | None = None) -> bool:
        """A process that should be answering and has been silent for `heartbeat_timeout`."""
        if self.phase not in LIVE_PHASES or self.last_seen is None:
            return False
        now = self.clock() if now is None else now
        return now - self.last_seen >= self.heartbeat_timeout

    # --- internals -----------------------------------------------------------------------------------

    def _seen(self) -> None:
        self.last_seen = self.clock()

    def _terminate(self, intent: StopIntent, grace: float) -> list[Action]:
        self.phase = Phase.STOPPING
        self.intent = intent
        self.kill_at = self.clock() + grace
        return [Terminate(intent)]


# --- views over all bots ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    total: int
    connected: int
    starting: int
    restarting: int
    failed: int
    stopping: int
    not_responding: int
    in_flight: int
    dingtalk_calls_month: int = 0
    not_connected: tuple[tuple[str, str], ...] = ()  # (bot, why) of the bots that should and do not serve


NOT_CONNECTED_SHOWN = 5  # bots named in STATUS; the rest are counted
REASON_MAX = 80  # characters of each reason in STATUS


def summarize(lifecycles: Iterable[BotLifecycle], now: float) -> Summary:
    items = list(lifecycles)

    def count(*phases: Phase) -> int:
        return sum(1 for lc in items if lc.phase in phases)

    restarting = count(Phase.BACKOFF) + sum(
        1 for lc in items if lc.phase is Phase.STOPPING and lc.intent is not StopIntent.STOP
    )
    return Summary(
        total=len(items),
        connected=count(Phase.RUNNING),
        starting=count(Phase.STARTING),
        restarting=restarting,
        failed=count(Phase.FATAL),
        stopping=sum(1 for lc in items if lc.phase is Phase.STOPPING and lc.intent is StopIntent.STOP),
        not_responding=sum(1 for lc in items if lc.stale(now)),
        in_flight=sum(lc.in_flight for lc in items),
        dingtalk_calls_month=sum(lc.dingtalk_calls_month for lc in items),
        not_connected=tuple((lc.name, why) for lc in items if (why := _why_not_connected(lc, now)) is not None),
    )


def _why_not_connected(lifecycle: BotLifecycle, now: float) -> str | None:
    problem = lifecycle.problem
    if lifecycle.phase is Phase.STARTING:
        return "not responding" if lifecycle.stale(now) else problem or "connecting"
    if lifecycle.phase is Phase.BACKOFF:
        return f"restarting; {problem}" if problem else "restarting"
    if lifecycle.phase is Phase.FATAL:
        return problem or "failed"
    return None


def status_text(summary: Summary) -> str:
    """The `STATUS=` line `systemctl status` shows."""
    parts = [
        f"{summary.connected}/{summary.total} bots connected",
        f"{summary.starting} starting",
        f"{summary.restarting} restarting",
        f"{summary.failed} failed",
    ]
    if summary.stopping:
        parts.append(f"{summary.stopping} stopping")
    if summary.not_responding:
        parts.append(f"{summary.not_responding} not responding")
    noun = "conversation" if summary.in_flight == 1 else "conversations"
    text = f"{', '.join(parts)}; {summary.in_flight} {noun} in flight"
    if summary.dingtalk_calls_month:
        text += f"; {summary.dingtalk_calls_month} DingTalk calls this month"
    if summary.not_connected:
        shown = [f"{name} ({_short(why)})" for name, why in summary.not_connected[:NOT_CONNECTED_SHOWN]]
        more = len(summary.not_connected) - len(shown)
        text += "; not connected: " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")
    return text


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"


def all_settled(lifecycles: Iterable[BotLifecycle]) -> bool:
    """Every bot connected or given up on."""
    return all(lc.phase in (Phase.RUNNING, Phase.FATAL) for lc in lifecycles)


def ready_due(lifecycles: Iterable[BotLifecycle], now: float, start_deadline: float) -> bool:
    """The moment to tell systemd READY=1: every bot connected or given up on, or the start window over. A
    bot that cannot reach its gateway must not hold up the others until systemd's start timeout kills all."""
    return all_settled(lifecycles) or now >= start_deadline


def all_fatal(lifecycles: Iterable[BotLifecycle]) -> bool:
    """Every bot failed on its configuration: the supervisor has nothing left to run."""
    items = list(lifecycles)
    return bool(items) and all(lc.phase is Phase.FATAL for lc in items)


def healthy(lifecycles: Iterable[BotLifecycle], now: float) -> bool:
    """No process that should answer is silent: the condition for sending WATCHDOG=1."""
    return not any(lc.stale(now) for lc in lifecycles)
