"""The `dingdifyd` command: argument parsing and the mapping of errors to sysexits codes, nothing else."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dingdifyd import __version__
from dingdifyd.errors import EX_CONFIG, EX_OK, EX_USAGE, ConfigError, DingdifydError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dingdifyd",
        description="Connect DingTalk Stream robots to Dify apps; answers stream into DingTalk AI cards.",
    )
    parser.add_argument("--version", action="version", version=f"dingdifyd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon: a supervisor and one process per bot")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="the YAML configuration file")
    run.add_argument("--bot", action="append", metavar="NAME", help="run only this bot (repeatable)")

    check = commands.add_parser("check-config", help="validate a configuration and print it, secrets masked")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    check.add_argument("-q", "--quiet", action="store_true", help="print only problems")

    doctor = commands.add_parser("doctor", help="check each bot online: DingTalk credentials, permissions, Dify app")
    doctor.add_argument("-c", "--config", required=True, metavar="FILE")
    doctor.add_argument("--bot", action="append", metavar="NAME", help="check only this bot (repeatable)")

    chat = commands.add_parser("chat", help="chat with a bot's Dify app in the terminal, through the bridge code")
    chat.add_argument("-c", "--config", required=True, metavar="FILE")
    chat.add_argument("--bot", required=True, metavar="NAME")
    chat.add_argument("--user", default="terminal", help="the user id the terminal chats as (default: terminal)")

    status = commands.add_parser("status", help="live state of the running instances and their bots")
    status.add_argument("-c", "--config", metavar="FILE", help="this instance only (default: every instance)")
    status.add_argument("--json", action="store_true", help="the status documents as JSON")

    setup = commands.add_parser("setup", help="create /etc/dingdifyd/NAME.yaml step by step (QR code registration)")
    setup.add_argument("name", metavar="NAME", help="the instance: its config is NAME.yaml, its unit dingdifyd@NAME")
    setup.add_argument("--config-dir", default="/etc/dingdifyd", metavar="DIR",
                       help="where to write (default %(default)s)")  # fmt: skip
    setup.add_argument("--dingtalk-api-base", default="https://api.dingtalk.com", metavar="URL", help=argparse.SUPPRESS)
    setup.add_argument("--dingtalk-oapi-base", default="https://oapi.dingtalk.com", metavar="URL",
                       help=argparse.SUPPRESS)  # fmt: skip
    setup.add_argument("--systemd-dir", default="/etc/systemd/system", metavar="DIR", help=argparse.SUPPRESS)

    demo = commands.add_parser("demo", help="run the daemon against built-in DingTalk and Dify simulators")
    demo.add_argument("--speed", type=float, default=1.0, help="answer speed factor (default 1.0)")
    demo.add_argument(
        "--dify-version", choices=("1.16.1", "0.15.3"), default="1.16.1",
        help="the Dify the simulator plays (default 1.16.1; its demo includes a human-input form)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EX_USAGE
    try:
        if args.command == "check-config":
            return check_config(args.config, quiet=args.quiet)
        if args.command == "run":
            from dingdifyd.supervisor import main as run_daemon
            from dingdifyd.worker import run_bot

            return run_daemon(args.config, run_bot, args.bot)
        if args.command == "doctor":
            from dingdifyd.commands.doctor import run_doctor

            return run_doctor(args.config, args.bot)
        if args.command == "chat":
            from dingdifyd.commands.chat import run_chat

            return run_chat(args.config, args.bot, args.user)
        if args.command == "status":
            from dingdifyd.commands.status import run_status

            return run_status(args.config, as_json=args.json)
        if args.command == "setup":
            from dingdifyd.commands.setup import run_setup

            return run_setup(args.name, config_dir=args.config_dir, api_base=args.dingtalk_api_base,
                             oapi_base=args.dingtalk_oapi_base, systemd_dir=args.systemd_dir)  # fmt: skip
        if args.command == "demo":
            from dingdifyd.commands.demo import run_demo

            return run_demo(speed=args.speed, dify_version=args.dify_version)
    except ConfigError as exc:
        _print_problems(getattr(args, "config", None) or args.command, exc)
        return EX_CONFIG
    except DingdifydError as exc:
        print(f"dingdifyd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")


def check_config(path: str, *, quiet: bool = False) -> int:
    from dingdifyd import config

    loaded = config.load(path)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not quiet:
        print(config.render_effective(loaded), end="")
    print(f"{path}: OK, {len(loaded.bots)} bot(s)", file=sys.stderr)
    return EX_OK


def _print_problems(path: str, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.problems)} problem(s):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
