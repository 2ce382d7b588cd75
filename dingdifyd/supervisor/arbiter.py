"""The supervisor's main loop: one forked process per bot, restarted with back-off, reported to systemd.

One thread, no event loop: it forks, so it must hold nothing a child could inherit half-way (threads, an event
loop, sockets, an open store). It blocks in `multiprocessing.connection.wait()` on every child's sentinel and
pipe and on the signal wakeup pipe, then, in this order: acts on signals, reads child messages, reaps
exited children, fires due restarts / kills (per `state.BotLifecycle`), and updates systemd (STATUS, READY,
WATCHDOG).

READY=1 is sent once every bot is connected or FATAL, or the start window (`start_timeout`) is over: at start,
and again after each SIGHUP reload (also a rejected one), so `systemctl reload` completes when the new
configuration actually serves, and one bot that cannot connect never holds up the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import dingdifyd.config
from dingdifyd.config import BotConfig, DaemonConfig
from dingdifyd.errors import EX_CONFIG, EX_OK, EX_SOFTWARE, EX_USAGE, ConfigError
from dingdifyd.logs.fields import event
from dingdifyd.logs.setup import register_secret, setup_logging
from dingdifyd.pacing.backoff import Backoff
from dingdifyd.paths import served_status_socket
from dingdifyd.supervisor.endpoints import Endpoints, MetricsEndpoint, StatusEndpoint
from dingdifyd.supervisor.live import LiveView
from dingdifyd.supervisor.notify import Notifier, watchdog_interval
from dingdifyd.supervisor.signals import SignalQueue, reset_in_child
from dingdifyd.supervisor.state import (
    Action,
    BotLifecycle,
    Kill,
    Phase,
    ScheduleSpawn,
    Spawn,
    StopIntent,
    Terminate,
    all_fatal,
    all_settled,
    healthy,
    ready_due,
    status_text,
    summarize,
)

log = logging.getLogger(__name__)

# runs in the child; exits with its own code
ChildTarget = Callable[[BotConfig, DaemonConfig, Connection], None]
LogSetup = Callable[[str, "str | None"], Any]

STOP_MARGIN = 1.0  # beyond stop_timeout, for a child to close its connections after draining
# SIGTERM -> SIGKILL for a silent child: its loop is stuck, so it can rarely act on SIGTERM
HUNG_KILL_GRACE = 5.0
MAX_WAIT = 1.0  # upper bound of one wait(), so that nothing depends on a wakeup arriving
MAX_MESSAGES_PER_PASS = 100  # per child, so a chatty child cannot starve the loop

_FORK = multiprocessing.get_context("fork")  # explicit: Python 3.14 changed the POSIX default


@dataclass
class _Child:
    name: str
    process: BaseProcess
    reader: Connection
    reader_open: bool = True
    killed: bool = False  # we sent it SIGKILL


def _child_entry(
    prepare: Callable[[BotConfig], BotConfig],
    target: ChildTarget,
    bot: BotConfig,
    daemon: DaemonConfig,
    conn: Connection,
) -> None:
    """The first code a forked child runs: shed the supervisor's state, load its own secrets, run the target."""
    try:
        bot = prepare(bot)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config: %s", problem)
        raise SystemExit(EX_CONFIG) from None
    try:
        target(bot, daemon, conn)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    except BaseException:
        # through our log handler (bot name, priority), not multiprocessing's bare traceback on stderr
        log.exception("%s: the bot process failed", bot.name)
        raise SystemExit(EX_SOFTWARE) from None


class Arbiter:
    def __init__(
        self,
        config_path: str,
        *,
        bot_names: list[str] | None = None,
        target: ChildTarget,
        load_config: Callable[[str], DaemonConfig] = dingdifyd.config.load,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        log_setup: LogSetup | None = setup_logging,
        stable_after: float = 10.0,
        rand: Callable[[], float] = random.random,
    ):
        self._config_path = config_path
        self._bot_names = list(bot_names) if bot_names else None
        self._target = target
        self._load_config = load_config
        self._notifier = notifier if notifier is not None else Notifier()
        self._clock = clock
        self._log_setup = log_setup
        self._stable_after = stable_after
        self._rand = rand
        self._daemon: DaemonConfig | None = None
        self._configs: dict[str, BotConfig] = {}  # the bots that should run, in config order
        self._lifecycles: dict[str, BotLifecycle] = {}  # also bots still stopping after their removal
        self._children: dict[str, _Child] = {}  # live processes
        self._signals: SignalQueue | None = None
        self._stopping = False
        self._ready_pending = True
        self._ready_deadline = float("inf")  # READY=1 at the latest then, connected or not
        self._status_note = ""
        self._last_status: str | None = None
        self._watchdog_interval = watchdog_interval()
        self._next_ping = 0.0
        self._live = LiveView(config_path)  # pids, restarts, the bots' own reports: status and metrics
        self._endpoints = Endpoints()

    # --- entry ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped. Returns the process exit code: 0, 64 (unknown --bot), 78 (config)."""
        try:
            config = self._load_sealed()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config: %s", problem)
            return EX_CONFIG
        selected, unknown = self._select(config)
        if unknown:
            log.error("--bot %s: no such bot in %s", ", ".join(unknown), self._config_path)
            return EX_USAGE
        self._apply_daemon_config(config)
        self._configs = selected
        self._ready_deadline = self._clock() + config.start_timeout
        try:
            self._endpoints = self._open_endpoints(config)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config: %s", problem)
            return EX_CONFIG
        self._signals = SignalQueue()
        self._signals.install()
        try:
            log.info("starting %d bots: %s", len(selected), ", ".join(selected))
            for name in selected:
                self._lifecycles[name] = self._new_lifecycle(name)
                self._execute(name, self._lifecycles[name].start())
            return self._loop()
        finally:
            self._kill_leftovers()
            self._signals.uninstall()
            self._signals = None
            self._endpoints.close()

    def _loop(self) -> int:
        assert self._signals is not None
        while True:
            ready = wait(self._waitables(), self._wait_timeout())
            for signum in self._signals.drain():
                self._handle_signal(signum)
            for child in list(self._children.values()):
                if child.reader in ready:
                    self._read_messages(child)
            self._endpoints.serve(ready)
            self._reap()
            for name, lifecycle in list(self._lifecycles.items()):
                self._execute(name, lifecycle.tick())
            self._forget_removed()
            if self._stopping:
                if not self._children:
                    log.info("all bot processes stopped", extra=event("stopped"))
                    return EX_OK
            elif not self._children and all_fatal(self._wanted()):
                log.error("every bot failed on its configuration (exit 78); nothing left to run")
                return EX_CONFIG
            self._report()

    # --- config --------------------------------------------------------------------------------------

    def _load_sealed(self) -> DaemonConfig:
        """The configuration, checked with every secret read, then kept with every secret sealed: each bot
        process reads its own again after fork, so that none inherits another bot's (see config.Secret)."""
        return dingdifyd.config.sealed(self._load_config(self._config_path))

    def _select(self, config: DaemonConfig) -> tuple[dict[str, BotConfig], list[str]]:
        bots = {bot.name: bot for bot in config.bots}
        if self._bot_names is None:
            return bots, []
        unknown = [name for name in self._bot_names if name not in bots]
        return {name: bot for name, bot in bots.items() if name in self._bot_names}, unknown

    def _apply_daemon_config(self, config: DaemonConfig) -> None:
        for warning in config.warnings:
            log.warning("config: %s", warning)
        if self._log_setup is not None:
            self._log_setup(config.log_level, None)
        self._daemon = config
        for lifecycle in self._lifecycles.values():
            lifecycle.heartbeat_timeout = config.heartbeat_timeout
            lifecycle.kill_grace = self._kill_grace()
            lifecycle.backoff.minimum = config.restart_delay_min
            lifecycle.backoff.maximum = config.restart_delay_max

    def _open_endpoints(self, config: DaemonConfig) -> Endpoints:
        """The status socket and the metrics endpoint, bound before any fork (the children close their copies).
        Both are set at start: a reload that changes them is told to restart instead."""
        endpoints = Endpoints()
        try:
            path = served_status_socket(self._config_path, config.status_socket, os.environ)
            if path is not None:
                endpoints.status = StatusEndpoint(path, self._status_document)
            else:
                log.info("no status socket (no $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR; see status_socket)")
            if config.metrics_listen:
                from dingdifyd.supervisor.exposition import CONTENT_TYPE, render

                def metrics() -> bytes:
                    return render(self._live.metrics(self._lifecycles, list(self._lifecycles)))

                endpoints.metrics = MetricsEndpoint(config.metrics_listen, metrics, CONTENT_TYPE)
        except BaseException:
            endpoints.close()
            raise
        return endpoints

    def _status_document(self) -> dict[str, Any]:
        return self._live.status_document(
            self._lifecycles, list(self._lifecycles), status_line=self._last_status or "starting",
            ready=not self._ready_pending, stopping=self._stopping, monotonic_now=self._clock(),
        )  # fmt: skip

    def _kill_grace(self) -> float:
        assert self._daemon is not None
        return min(HUNG_KILL_GRACE, self._daemon.stop_timeout)

    def _stop_grace(self) -> float:
        assert self._daemon is not None
        return self._daemon.stop_timeout + STOP_MARGIN

    def _new_lifecycle(self, name: str) -> BotLifecycle:
        assert self._daemon is not None
        backoff = Backoff(self._daemon.restart_delay_min, self._daemon.restart_delay_max, rand=self._rand)
        return BotLifecycle(
            name,
            clock=self._clock,
            backoff=backoff,
            heartbeat_timeout=self._daemon.heartbeat_timeout,
            kill_grace=self._kill_grace(),
            stable_after=self._stable_after,
        )

    def _wanted(self) -> list[BotLifecycle]:
        return [self._lifecycles[name] for name in self._configs if name in self._lifecycles]

    # --- signals -------------------------------------------------------------------------------------

    def _handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self._stopping:
                self._kill_all(name)
            else:
                self._begin_stop(name)
        elif signum == signal.SIGHUP:
            if self._stopping:
                log.info("SIGHUP ignored: stopping")
            else:
                self._reload()

    def _begin_stop(self, signame: str) -> None:
        self._stopping = True
        grace = self._stop_grace()
        # systemd may allow less than our own bound (TimeoutStopSec): ask for what we need
        self._notifier.stopping(extend_timeout=grace + STOP_MARGIN)
        log.info(
            "%s received: stopping %d bot processes (SIGKILL after %.0f s)",
            signame,
            len(self._children),
            grace,
            extra=event("stopping"),
        )
        for name, lifecycle in list(self._lifecycles.items()):
            self._execute(name, lifecycle.stop(grace))

    def _kill_all(self, signame: str) -> None:
        log.warning("second %s: killing %d bot processes now", signame, len(self._children))
        for name, lifecycle in list(self._lifecycles.items()):
            self._execute(name, lifecycle.kill_now())

    def _reload(self) -> None:
        self._notifier.reloading()
        self._ready_pending = True
        assert self._daemon is not None
        self._ready_deadline = self._clock() + self._daemon.start_timeout
        log.info("SIGHUP received: reloading %s", self._config_path)
        try:
            config = self._load_sealed()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, keeping the running configuration: %s", problem)
            self._status_note = "last reload rejected: invalid config"
            return
        selected, unknown = self._select(config)
        if unknown:
            log.error("reload rejected: --bot %s no longer in %s", ", ".join(unknown), self._config_path)
            self._status_note = "last reload rejected: bot missing"
            return
        self._status_note = ""
        old_daemon, old = self._daemon, self._configs
        for key in ("metrics_listen", "status_socket"):
            if getattr(config, key) != getattr(old_daemon, key):
                log.warning("reload: %s changed; it takes effect when the service restarts", key)
        # children were handed the daemon-level settings at fork: if those changed, every child is stale
        daemon_changed = _daemon_settings(config) != _daemon_settings(old_daemon)
        self._apply_daemon_config(config)
        self._configs = selected
        grace = self._stop_grace()
        removed = [name for name in old if name not in selected]
        added = [name for name in selected if name not in old]
        changed = [
            name for name in selected if name in old and (daemon_changed or old[name] != selected[name])
        ]
        for name in removed:
            log.info("%s: removed from the configuration; stopping it", name)
            self._execute(name, self._lifecycles[name].stop(grace))
        for name in added:
            lifecycle = self._lifecycles.get(name)
            if lifecycle is None:  # else it is still stopping after an earlier removal: start it after that
                lifecycle = self._lifecycles[name] = self._new_lifecycle(name)
            log.info("%s: added to the configuration; starting it", name)
            self._execute(name, lifecycle.restart(grace))
        for name in changed:
            log.info("%s: configuration changed; restarting it", name)
            self._execute(name, self._lifecycles[name].restart(grace))
        log.info(
            "reloaded: %d added, %d removed, %d restarted, %d unchanged",
            len(added), len(removed), len(changed), len(selected) - len(added) - len(changed),
            extra=event("reloaded"),
        )  # fmt: skip

    # --- children ------------------------------------------------------------------------------------

    def _execute(self, name: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Spawn):
                self._spawn(name)
            elif isinstance(action, Terminate):
                if action.intent is StopIntent.REPLACE:
                    log.warning(
                        "%s: no heartbeat for %.0f s; terminating it",
                        name,
                        self._lifecycles[name].heartbeat_timeout,
                        extra=event("unresponsive", bot=name),
                    )
                self._signal(name, signal.SIGTERM)
            elif isinstance(action, Kill):
                if name in self._children:
                    log.warning("%s: still running; sending SIGKILL", name)
                self._signal(name, signal.SIGKILL)
            elif isinstance(action, ScheduleSpawn):
                log.info(
                    "%s: restarting in %.1f s (failure %d in a row)",
                    name,
                    action.delay,
                    self._lifecycles[name].failures,
                )

    def _spawn(self, name: str) -> None:
        assert self._daemon is not None
        lifecycle = self._lifecycles[name]
        bot = self._configs.get(name)
        if bot is None:  # removed while a restart was pending
            self._execute(name, lifecycle.stop(0.0))
            return
        reader, writer = _FORK.Pipe(duplex=False)
        process = _FORK.Process(
            target=_child_entry,
            args=(self._prepare_child, self._target, bot, self._daemon, writer),
            name=f"dingdifyd:{name}",
        )
        # registered before the fork, so the child closes its own copy of the reader with the others
        child = self._children[name] = _Child(name, process, reader)
        try:
            process.start()
        except OSError as exc:
            del self._children[name]
            reader.close()
            log.error("%s: cannot start a process: %s", name, exc)
            self._execute(name, lifecycle.exited(None))
            return
        finally:
            writer.close()
        lifecycle.spawned()
        restart = self._live.spawned(name, child.process.pid)
        log.info("%s: started (pid %s)", name, child.process.pid, extra=event("restarted" if restart else "started",
                                                                               bot=name))  # fmt: skip

    def _prepare_child(self, bot: BotConfig) -> BotConfig:
        """Runs in the forked child: drop everything of the supervisor's that it inherited, and read this bot's
        own secrets (the supervisor holds none: see _load_sealed). Returns the bot with them."""
        reset_in_child()
        self._endpoints.close_in_child()
        for child in self._children.values():
            child.reader.close()  # the supervisor's end of every pipe, this child's own included
        for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(variable, None)  # talking to systemd is the supervisor's job alone
        if self._log_setup is not None:
            self._log_setup(bot.log_level, bot.name)
        bot = dingdifyd.config.unseal_bot(self._config_path, bot)
        for secret in dingdifyd.config.bot_secrets(bot):
            register_secret(secret)  # never in a log line of this process
        return bot

    def _signal(self, name: str, signum: int) -> None:
        child = self._children.get(name)
        if child is None or child.process.pid is None:
            return
        if signum == signal.SIGKILL:
            child.killed = True
        # the child is not reaped before its sentinel fires, so its pid cannot have been reused yet
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signum)

    def _read_messages(self, child: _Child) -> None:
        lifecycle = self._lifecycles[child.name]
        for _ in range(MAX_MESSAGES_PER_PASS):
            try:
                if not child.reader_open or not child.reader.poll():
                    return
                message = child.reader.recv()
            except (EOFError, OSError):
                child.reader_open = False  # the child closed its end (or died): only its sentinel matters now
                return
            except Exception:
                log.warning("%s: unreadable message from the bot process ignored", child.name)
                continue
            self._handle_message(child.name, lifecycle, message)

    def _handle_message(self, name: str, lifecycle: BotLifecycle, message: object) -> None:
        match message:
            case ("heartbeat", int(in_flight)):
                lifecycle.heartbeat(in_flight)
            case ("heartbeat", int(in_flight), dict(stats)):
                lifecycle.heartbeat(in_flight, stats)
                self._live.reported(name, stats)
            case ("connected",):
                if lifecycle.phase is Phase.STARTING:
                    log.info("%s: connected", name, extra=event("connected", bot=name))
                lifecycle.connected()
                self._live.connected(name, True)
            case ("disconnected",):
                if lifecycle.phase is Phase.RUNNING:
                    log.warning("%s: disconnected; the bot process is reconnecting", name,
                                extra=event("disconnected", bot=name))  # fmt: skip
                lifecycle.disconnected()
                self._live.connected(name, False)
            case ("problem", str(text)):
                lifecycle.report_problem(text)
            case _:
                log.warning("%s: unknown message from the bot process ignored", name)

    def _reap(self) -> None:
        for name, child in list(self._children.items()):
            code = child.process.exitcode  # a non-blocking waitpid on this one pid
            if code is None:
                continue
            pid = child.process.pid
            self._read_messages(child)  # what it said before it ended
            child.reader.close()
            child.process.close()
            del self._children[name]
            lifecycle = self._lifecycles[name]
            uptime = self._clock() - lifecycle.started_at if lifecycle.started_at is not None else 0.0
            stopping = lifecycle.phase is Phase.STOPPING and lifecycle.intent is not StopIntent.REPLACE
            level = logging.INFO if stopping and code in (0, -signal.SIGTERM) else logging.WARNING
            how = _describe_exit(code, killed_by_us=child.killed)
            log.log(level, "%s: pid %s %s after %.1f s", name, pid, how, uptime, extra=event("exited", bot=name))
            self._live.exited(name, code)
            self._execute(name, lifecycle.exited(code))
            lifecycle.problem = "configuration or credentials refused (exit 78)" if code == EX_CONFIG else how
            if lifecycle.phase is Phase.FATAL:
                log.error(
                    "%s: configuration or credentials refused (exit %d); not restarting it until the "
                    "configuration changes (then SIGHUP)", name, code, extra=event("fatal", bot=name),
                )  # fmt: skip

    def _forget_removed(self) -> None:
        for name, lifecycle in list(self._lifecycles.items()):
            if name not in self._configs and name not in self._children and lifecycle.phase not in (
                Phase.STARTING, Phase.RUNNING, Phase.STOPPING, Phase.BACKOFF,
            ):  # fmt: skip
                del self._lifecycles[name]
                log.info("%s: stopped and removed", name)

    def _kill_leftovers(self) -> None:
        """Only on the way out of an unexpected error: never leave orphaned bot processes behind."""
        for child in self._children.values():
            if child.process.exitcode is None:
                log.error("%s: killing pid %s on the way out", child.name, child.process.pid)
                self._signal(child.name, signal.SIGKILL)
                child.process.join(5.0)
        self._children.clear()

    # --- waiting and reporting -----------------------------------------------------------------------

    def _waitables(self) -> list[Any]:
        assert self._signals is not None
        items: list[Any] = [self._signals.fileno(), *self._endpoints.waitables()]
        for child in self._children.values():
            items.append(child.process.sentinel)
            if child.reader_open:
                items.append(child.reader)
        return items

    def _wait_timeout(self) -> float:
        now = self._clock()
        deadlines = [d for d in (lc.next_deadline() for lc in self._lifecycles.values()) if d is not None]
        if self._watchdog_interval is not None:
            deadlines.append(self._next_ping)
        if self._ready_pending:
            deadlines.append(self._ready_deadline)
        if not deadlines:
            return MAX_WAIT
        return max(0.0, min(MAX_WAIT, min(deadlines) - now))

    def _report(self) -> None:
        now = self._clock()
        wanted = self._wanted()
        text = status_text(summarize(wanted, now))
        if self._status_note:
            text = f"{text}; {self._status_note}"
        if text != self._last_status:
            self._notifier.status(text)
            self._last_status = text
            log.debug("status: %s", text)
        if self._ready_pending and not self._stopping and ready_due(wanted, now, self._ready_deadline):
            self._notifier.ready()
            self._ready_pending = False
            if all_settled(wanted):
                log.info("ready: %s", text, extra=event("ready"))
            else:
                log.warning("ready after the %.0f s start window, not every bot connected: %s",
                            self._daemon.start_timeout if self._daemon else 0, text, extra=event("ready"))  # fmt: skip
        if self._watchdog_interval is not None and now >= self._next_ping:
            # Withheld while a child is silent: if replacing it does not bring it back, systemd's watchdog
            # restarts the whole service. A skipped slot is not retried early.
            self._next_ping = now + self._watchdog_interval
            if healthy(self._lifecycles.values(), now):
                self._notifier.watchdog()


def _daemon_settings(config: DaemonConfig | None) -> DaemonConfig | None:
    # the endpoints are the supervisor's own, set at start: no reason to restart the bots
    if config is None:
        return None
    return dataclasses.replace(config, bots=(), warnings=(), metrics_listen=None, status_socket=None)


def _describe_exit(code: int, *, killed_by_us: bool = False) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (out of memory?)" if code == -signal.SIGKILL and not killed_by_us else ""
    return f"killed by {name}{hint}"
