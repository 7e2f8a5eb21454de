"""The `nucleus-watcher` command: parse arguments, run one command, turn errors into one line.

Exit codes: 0 ok, 1 failures, 2 usage or config error. A user mistake never prints a traceback.

Commands are imported when they run, so `--help`, `devserver` and `demo` do not load the
daemon's dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from watcher import __version__
from watcher.errors import ConfigError, WatcherError

if TYPE_CHECKING:
    from watcher.config import Settings

    # What `add_subparsers` returns; argparse names it only privately.
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleus-watcher",
        description="Watch folders and feed finished images into Scale Nucleus datasets.",
    )
    parser.add_argument("--version", action="version", version=f"nucleus-watcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_config_commands(commands)
    _add_devserver(commands)
    _add_demo(commands)
    return parser


def _add_config_commands(commands: _Subparsers) -> None:
    """The commands that read a config file (`-c`), in the order `--help` lists them."""

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "-c", "--config", required=True, type=Path, help="the TOML config file"
        )
        return command

    with_config("run", "the daemon: watch, settle, upload (foreground; systemd runs this)")
    with_config("scan", "one pass: reconcile every watch, upload what is pending, wait for jobs")
    status = with_config("status", "counts per state and watch, backlog age, last errors")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    explain = with_config("explain", "dataset, reference_id, metadata and state for one path")
    explain.add_argument("path", type=Path)
    check = with_config("check", "validate the config; --online also checks key and datasets")
    check.add_argument("--online", action="store_true")
    retry = with_config("retry", "re-queue failed items (all, or those at PATH...)")
    retry.add_argument("paths", nargs="*", type=Path, metavar="PATH")


def _add_devserver(commands: _Subparsers) -> None:
    devserver = commands.add_parser(
        "devserver", help="a local Nucleus-compatible endpoint for trying things out"
    )
    devserver.add_argument("--host", default="127.0.0.1")
    devserver.add_argument("--port", type=int, default=0)
    devserver.add_argument("--data", type=Path, default=None, help="keep what it receives here")
    devserver.add_argument("--api-key", default=None, help="accept only this key")
    devserver.add_argument("--job-delay", type=float, default=0.0, metavar="SECONDS")
    devserver.add_argument(
        "--dataset", action="append", default=[], help="the only dataset ids that exist"
    )
    devserver.add_argument(
        "--link-rate",
        type=_link_rate,
        default=None,
        metavar="RATE",
        help='read request bodies at most this fast, all connections together ("1MiB/s")',
    )


def _add_demo(commands: _Subparsers) -> None:
    demo = commands.add_parser(
        "demo", help="the whole thing on a temporary folder against a local devserver, no setup"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep the daemon and devserver running (and the folder) until Ctrl-C",
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=6.0,
        metavar="N",
        help="write the sample images over about N seconds",
    )
    demo.add_argument(
        "--link-rate",
        type=_link_rate,
        default=None,
        metavar="RATE",
        help='a thin uplink: the devserver reads uploads at most this fast ("64KiB/s")',
    )


def _link_rate(text: str) -> int | None:
    from watcher.config import parse_bandwidth_limit

    try:
        return parse_bandwidth_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except WatcherError as exc:
        print(f"nucleus-watcher: {exc}", file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `status --json | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "devserver":
        from watcher.devserver import serve_forever_cli

        return serve_forever_cli(
            args.host,
            args.port,
            args.data,
            args.api_key,
            args.job_delay,
            args.dataset,
            args.link_rate,
        )
    if args.command == "demo":
        from watcher.commands import run_demo

        return run_demo(
            keep=args.keep, seconds=args.seconds, link_rate_bytes_per_second=args.link_rate
        )
    return _run_with_config(args)


def _run_with_config(args: argparse.Namespace) -> int:
    """Load the config, check its files, resolve the key when the command talks to Nucleus,
    set up logging, then run the command."""
    from watcher.config import check_files, load_settings, resolve_api_key
    from watcher.service import configure_logging

    settings = load_settings(args.config)
    if args.command in ("check", "run", "scan"):
        check_files(settings, args.config.name)
    if args.command in ("run", "scan") or (args.command == "check" and args.online):
        api_key = resolve_api_key(settings.nucleus)
        secrets = [api_key]
    else:
        api_key, secrets = "", []
    configure_logging(format=settings.log.format, level=settings.log.level, secrets=secrets)
    return _CONFIG_COMMANDS[args.command](args, settings, api_key)


def _run(args: argparse.Namespace, settings: Settings, api_key: str) -> int:
    from watcher.service import run_daemon

    return run_daemon(args.config, settings, api_key)


def _scan(args: argparse.Namespace, settings: Settings, api_key: str) -> int:
    from watcher.commands import run_scan

    return run_scan(settings, api_key)


def _status(args: argparse.Namespace, settings: Settings, api_key: str) -> int:
    from watcher.commands import print_status

    return print_status(settings, as_json=args.json)


def _explain(args: argparse.Namespace, settings: Settings, api_key: str) -> int:
    from watcher.commands import explain

    return explain(settings, args.path)


def _check(args: argparse.Namespace, settings: Settings, api_key: str) -> int:
    from watcher.commands import check

    return check(settings, api_key if args.online else None)


def _retry(args: argparse.Namespace, settings: Settings, api_key: str) -> int:
    from watcher.commands import retry

    return retry(settings, args.paths)


# The commands that read a config file, by name (as `_add_config_commands` declares them).
_CONFIG_COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, str], int]] = {
    "run": _run,
    "scan": _scan,
    "status": _status,
    "explain": _explain,
    "check": _check,
    "retry": _retry,
}
