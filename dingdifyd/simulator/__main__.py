"""`python -m dingdifyd.simulator`: the fake DingTalk and the fake Dify in a process of their own.

For the system test (inside its container, where the daemon runs under systemd), the demo and the benchmarks.
Both fakes listen on 127.0.0.1; the fake DingTalk also serves the control API (`/_sim/`, see `control.py`).
Once both listen, one JSON line goes to stdout (and to `--ready-file`):
`{"dingtalk": URL, "dify": URL, "control": URL}`. SIGTERM or SIGINT stops it.

    python -m dingdifyd.simulator --dingtalk-port 18080 --dify-port 18081 \\
        --app dingci:ci-client-secret --dify-app app-ci-key:chatbot
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dingdifyd.simulator.control import PREFIX, control_routes
from dingdifyd.simulator.dify import DIFY_0_15, MODES, VERSIONS, FakeDify
from dingdifyd.simulator.dingtalk import FakeDingTalk

log = logging.getLogger("dingdifyd.simulator")

# our `dify_app_type` names -> Dify's app modes
APP_TYPE_MODES = {
    "chatbot": "chat",
    "agent": "agent-chat",
    "chatflow": "advanced-chat",
    "workflow": "workflow",
    "completion": "completion",
}
DEFAULT_APP = "dingsim:sim-client-secret"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dingdifyd.simulator",
        description="Run the fake DingTalk (with the /_sim/ control API) and the fake Dify on 127.0.0.1.",
    )
    parser.add_argument("--dingtalk-port", type=int, default=0, help="fake DingTalk port (default: a free one)")
    parser.add_argument("--dify-port", type=int, default=0, help="fake Dify port (default: a free one)")
    parser.add_argument(
        "--app", action="append", metavar="CLIENT_ID:CLIENT_SECRET[:ROBOT_CODE]",
        help=f"a DingTalk robot app the fake knows (repeatable; default {DEFAULT_APP})",
    )  # fmt: skip
    parser.add_argument(
        "--dify-app", action="append", default=[], metavar="API_KEY:TYPE",
        help="a Dify app: its API key and type (chatbot, agent, chatflow, workflow, completion) (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--no-default-dify-apps", action="store_true",
        help="do not register the default apps (app-fake-chatbot, app-fake-agent, ...)",
    )  # fmt: skip
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds between two answer words")
    parser.add_argument(
        "--dify-version", choices=VERSIONS, default=DIFY_0_15, help="the Dify version the fake Dify speaks",
    )  # fmt: skip
    parser.add_argument("--mention-turn", action="store_true", help="echo answers say which turn they are")
    parser.add_argument(
        "--redeliver-after", type=float, default=60.0,
        help="seconds before an unACKed frame is sent again, like DingTalk (0: never)",
    )  # fmt: skip
    parser.add_argument("--ready-file", type=Path, help="also write the ready line to this file")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def _split_app(text: str) -> tuple[str, str, str | None]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise argparse.ArgumentTypeError(f"--app {text!r}: expected CLIENT_ID:CLIENT_SECRET[:ROBOT_CODE]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _split_dify_app(text: str) -> tuple[str, str]:
    key, _, kind = text.rpartition(":")
    mode = APP_TYPE_MODES.get(kind, kind)
    if not key or mode not in MODES:
        raise argparse.ArgumentTypeError(
            f"--dify-app {text!r}: expected API_KEY:TYPE, TYPE one of {', '.join(APP_TYPE_MODES)}"
        )
    return key, mode


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    apps = [_split_app(text) for text in (args.app or [DEFAULT_APP])]
    dify_apps = [_split_dify_app(text) for text in args.dify_app]

    dify = FakeDify(version=args.dify_version)
    if not args.no_default_dify_apps:
        dify.add_default_apps()
    for key, mode in dify_apps:
        dify.add_app(key, mode)
    for key in dify.apps:
        dify.configure(key, token_delay=args.token_delay, mention_turn=args.mention_turn)

    dingtalk = FakeDingTalk(port=args.dingtalk_port, redeliver_after=args.redeliver_after or None)
    for client_id, secret, robot_code in apps:
        dingtalk.register_app(client_id, secret, robot_code=robot_code)
    dingtalk.extra_routes.extend(control_routes(dingtalk, dify))

    await dify.start("127.0.0.1", args.dify_port)
    try:
        await dingtalk.start()
        try:
            ready = {"dingtalk": dingtalk.base_url, "dify": dify.base_url, "control": dingtalk.base_url + PREFIX}
            line = json.dumps(ready)
            if args.ready_file is not None:
                _write_atomically(args.ready_file, line + "\n")
            print(line, flush=True)
            log.info("simulators ready: %s", line)
            await stop.wait()
            log.info("stopping")
        finally:
            await dingtalk.close()
    finally:
        await dify.close()


def _write_atomically(path: Path, text: str) -> None:
    """A reader polling for the file never sees it half-written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(args, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        for text in args.app or []:
            _split_app(text)
        for text in args.dify_app:
            _split_dify_app(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_main(args))
    except OSError as exc:  # a port in use, mostly
        print(f"simulator: {exc}", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    with contextlib.suppress(FileNotFoundError):
        if args.ready_file is not None:
            args.ready_file.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
