"""``ingest audit``: the subcommand, its arguments and exit status."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from functools import partial
from typing import Final

import anyio
import asyncpg

from ingest.errors import ConfigError
from ingest.formats.decode import load_routes
from ingest.formats.limits import Limits
from ingest.settings import Settings
from ingest.tools.audit.output import format_table, visible
from ingest.tools.audit.scan import audit
from ingest.tools.audit.simulator_report import SimReport, load_report
from ingest.tools.audit.window import window

__all__ = ["EXIT_CONFIG", "EXIT_MISMATCH", "EXIT_OK", "register"]

EXIT_OK: Final = 0
EXIT_MISMATCH: Final = 1
EXIT_CONFIG: Final = 2


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_settings_flags: Callable[[argparse.ArgumentParser, set[str] | None], None],
) -> None:
    """Add the ``audit`` subcommand; ``ingest.cli`` calls ``args.handler(args, settings)``."""
    p = sub.add_parser(
        "audit",
        help="reconcile what arrived per device (seq gaps, dead letters, simulator report)",
        description="Per device in a time window: readings, samples, seq gaps, dead letters; "
        "with a simulator report, expected against found. Exit 0 when everything reconciles, "
        "1 when not, 2 for configuration errors.",
    )
    p.add_argument("--since", metavar="TIME", help="RFC 3339, 'now', or ago: 90s, 15m, 2h, 7d")
    p.add_argument("--until", metavar="TIME", help="end of the window (exclusive), same forms")
    p.add_argument(
        "--device", metavar="ID", nargs="+", action="extend", default=[], help="only these devices"
    )
    p.add_argument(
        "--report", metavar="FILE", help="simulate --report json output to compare ('-': stdin)"
    )
    p.add_argument(
        "--samples-per-message",
        metavar="K",
        type=_positive_int,
        help="to estimate messages from samples (default: the report's, else 1)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--config", metavar="FILE", help="TOML file with settings")
    add_settings_flags(
        p,
        {"database_url", "topic", "db_connect_timeout", "log_level", "log_format"}
        # A dead letter refused by a limit is decoded again under the limits given now.
        | {"max_readings_per_message", "max_ts_ahead", "min_ts", "max_text_bytes"},
    )
    p.set_defaults(handler=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _read_report(path: str) -> SimReport:
    if path == "-":
        return load_report(sys.stdin.read(), "stdin")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("--report", f"cannot read {path}: {exc.strerror or exc}") from None
    return load_report(text, path)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``ingest audit``: everything blocking (the report file) is read before the event loop."""
    try:
        since, until = window(args.since, args.until)
        routes = load_routes(settings)
        report = _read_report(args.report) if args.report else None
    except ConfigError as exc:
        print(f"ingest: configuration error: {visible(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    stream = sys.stderr if sys.stderr.isatty() else None
    try:
        result = anyio.run(
            partial(
                audit,
                settings.database_url,
                routes=routes,
                since=since,
                until=until,
                devices=args.device,
                report=report,
                samples_per_message=args.samples_per_message,
                connect_timeout=settings.db_connect_timeout,
                progress=stream,
                limits=Limits.from_settings(settings),
            )
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"ingest audit: cannot read the database: {visible(_describe(exc))}", file=sys.stderr)
        return EXIT_MISMATCH
    if args.json:  # JSON escapes every control character itself (\u001b)
        print(json.dumps(result.to_json(), indent=None, separators=(",", ":")))
    else:
        print(format_table(result))
    assert result.verdict is not None
    return EXIT_OK if result.verdict.ok else EXIT_MISMATCH


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"{exc} (run `ingest migrate` first?)"
    return f"{type(exc).__name__}: {exc}"
