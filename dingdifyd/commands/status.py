"""`dingdifyd status [-c FILE] [--json]`: ask running instances how their bots are, through their status sockets.

Live, from the supervisor (which has it from each bot process's heartbeats): per bot its state, since when it
is connected, reconnects and restarts, the reason it was given up on, answers in flight and queued, answered
and failed today, DingTalk calls today and this month against the budget, the last error and Dify's state.

Without `-c`, every instance: the configs in /etc/dingdifyd (example.yaml aside) and every socket under
/run/dingdifyd. Exit status as `systemctl status`'s: 0 every instance asked runs, 3 one is stopped (no socket,
or nobody answers on it), 4 one could not be asked (permission denied: root or the group dingdifyd may).
The config file is only read for `status_socket`, never validated: secrets that are systemd credentials are not
needed to ask.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from dingdifyd.paths import (
    CONFIG_DIR,
    RUNTIME_ROOT,
    SOCKET_NAME,
    instance_name,
    status_socket_candidates,
)

EXIT_RUNNING = 0
EXIT_STOPPED = 3  # LSB: program is not running (what `systemctl status` and `is-active` return)
EXIT_UNKNOWN = 4  # LSB: status unknown
ASK_TIMEOUT = 5.0
IGNORED_CONFIGS = ("example",)


@dataclass(frozen=True)
class Answer:
    name: str
    config: str
    socket: str | None  # the socket asked (or the first place looked)
    status: dict[str, Any] | None  # the instance's status document; None: not running or not asked
    error: str | None = None  # why there is no status
    exit_code: int = EXIT_RUNNING


def configured_socket(config_path: str) -> str | None:
    """The file's `status_socket`, read without validating anything else."""
    try:
        raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = raw.get("status_socket") if isinstance(raw, dict) else None
    return str(value).strip() if value not in (None, "") else None


def ask(path: str, timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """The status document served at `path`. Raises FileNotFoundError / ConnectionRefusedError (not running),
    PermissionError, or ValueError (an unreadable answer)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    document = json.loads(b"".join(chunks).decode("utf-8"))
    if not isinstance(document, dict) or "bots" not in document:
        raise ValueError("not a dingdifyd status document")
    return document


def query(config_path: str, environ: Mapping[str, str], runtime_root: str = RUNTIME_ROOT) -> Answer:
    name = instance_name(config_path)
    candidates = status_socket_candidates(config_path, configured_socket(config_path), environ, runtime_root)
    if not candidates:
        return Answer(name, config_path, None, None, "status_socket is off in its configuration", EXIT_UNKNOWN)
    for path in candidates:
        try:
            return Answer(name, config_path, path, ask(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            continue
        except PermissionError:
            why = "permission denied (ask as root or as a member of the group dingdifyd)"
            return Answer(name, config_path, path, None, why, EXIT_UNKNOWN)
        except (OSError, ValueError) as exc:
            return Answer(name, config_path, path, None, f"no usable answer ({type(exc).__name__})", EXIT_UNKNOWN)
    return Answer(name, config_path, candidates[0], None, "stopped", EXIT_STOPPED)


def instances(config_dir: str = CONFIG_DIR, runtime_root: str = RUNTIME_ROOT) -> list[str]:
    """The config paths of every instance: configured ones, and running ones whose config is elsewhere."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for path in sorted(Path(config_dir).glob("*.yaml")):
            if instance_name(path) not in IGNORED_CONFIGS:
                found[instance_name(path)] = str(path)
    with contextlib.suppress(OSError):
        for sock in sorted(Path(runtime_root).glob(f"*/{SOCKET_NAME}")):
            found.setdefault(sock.parent.name, str(Path(config_dir) / f"{sock.parent.name}.yaml"))
    return list(found.values())


def run_status(
    config_path: str | None,
    *,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    environ: Mapping[str, str] | None = None,
    config_dir: str = CONFIG_DIR,
    runtime_root: str = RUNTIME_ROOT,
) -> int:
    environ = os.environ if environ is None else environ
    paths = [config_path] if config_path else instances(config_dir, runtime_root)
    if not paths:
        out.write(f"no instances: no configuration in {config_dir} and nothing running under {runtime_root}\n")
        return EXIT_STOPPED
    answers = [query(path, environ, runtime_root) for path in paths]
    if as_json:
        json.dump({"instances": [_as_json(answer) for answer in answers]}, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write("\n".join(render(answer) for answer in answers) + "\n")
    return max(answer.exit_code for answer in answers)


def _as_json(answer: Answer) -> dict[str, Any]:
    return {"name": answer.name, "config": answer.config, "socket": answer.socket,
            "running": answer.status is not None, "error": answer.error, "status": answer.status}  # fmt: skip


# --- text ------------------------------------------------------------------------------------------------


def label(name: str) -> str:
    return "dingdifyd" if name == "dingdifyd" else f"dingdifyd@{name}"


def render(answer: Answer, now: float | None = None) -> str:
    now = time.time() if now is None else now
    doc = answer.status
    if doc is None:
        where = f" (no answer at {answer.socket})" if answer.error == "stopped" and answer.socket else ""
        return f"{label(answer.name)}: {answer.error}{where}"
    lines = [
        f"{label(answer.name)}: running since {_when(doc.get('started_at'), now)} (pid {doc.get('pid')}), "
        f"{doc.get('config')}",
        f"  {doc.get('status')}" + ("; stopping" if doc.get("stopping") else ""),
    ]
    for bot in doc.get("bots") or ():
        lines.extend(_bot_lines(bot, now))
    return "\n".join(lines)


def _bot_lines(bot: Mapping[str, Any], now: float) -> list[str]:
    state = bot.get("state")
    restarts = f"{bot.get('restarts', 0)} restart{'s' if bot.get('restarts', 0) != 1 else ''}"
    if state == "running" and bot.get("connected_since"):
        head = (f"connected since {_when(bot['connected_since'], now)}, {bot.get('reconnects', 0)} reconnects, "
                f"{restarts} (pid {bot.get('pid')})")  # fmt: skip
    elif state == "fatal":
        head = f"FATAL: {bot.get('fatal_reason')}"
    elif state == "backoff":
        head = f"restarting in {bot.get('restart_in') or 0:.1f} s after {_exit(bot.get('last_exit'))}, {restarts}"
    else:
        head = f"{state}, {restarts}" + (f" (pid {bot['pid']})" if bot.get("pid") else "")
    lines = [f"  {bot.get('name')}: {head}"]
    if "answered_today" in bot:
        lines.append(f"    answers: {bot.get('in_flight', 0)} in flight, {bot.get('queued', 0)} queued; today "
                     f"{bot.get('answered_today', 0)} answered, {bot.get('failed_today', 0)} failed")  # fmt: skip
    budget = bot.get("dingtalk_monthly_budget")
    month = f"{bot.get('dingtalk_calls_month', 0)} this month" + (f" of {budget}" if budget else "")
    pacing = bot.get("pacing")
    lines.append(f"    DingTalk calls: {bot.get('dingtalk_calls_today', 0)} today, {month}"
                 + (f" (card updates: {pacing})" if pacing and pacing != "normal" else ""))  # fmt: skip
    dify = bot.get("dify")
    if isinstance(dify, dict):
        at = f" at {_when(dify['at'], now)}" if dify.get("at") else ""
        lines.append(f"    Dify: {dify.get('state')} ({dify.get('detail')}{at})")
    error = bot.get("last_error")
    if isinstance(error, dict) and state != "fatal":  # a fatal bot's last error is its reason, shown above
        lines.append(f"    last error: {_when(error.get('at'), now)} {error.get('text')}")
    return lines


def _exit(last_exit: Any) -> str:
    if not isinstance(last_exit, dict) or last_exit.get("code") is None:
        return "a failed start"
    code = last_exit["code"]
    return f"exit {code}" if code >= 0 else f"signal {-code}"


def _when(timestamp: Any, now: float) -> str:
    if not isinstance(timestamp, int | float):
        return "?"
    moment = datetime.fromtimestamp(timestamp)
    shown = moment.strftime("%H:%M:%S") if now - timestamp < 20 * 3600 else moment.strftime("%Y-%m-%d %H:%M")
    return f"{shown} ({_ago(now - timestamp)} ago)"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"
