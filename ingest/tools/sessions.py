"""``ingest sessions list | retire``: the persistent MQTT sessions the daemons opened.

``list`` shows the ``sessions`` table (migrations/0007_sessions.sql) with each session's state:
``live`` (seen within two minutes and not disconnected cleanly: a worker may be connected),
``away`` (its worker is gone; the broker keeps queueing its share until the session expires)
or ``retired``. ``retire CLIENT_ID...`` drains such sessions through the normal pipeline and
ends them at the broker (``ingest.runtime.retire``). Exit status: 0, 1 naming the cause (a
client id that could not be retired, a database or broker that cannot be reached), 2 for a
configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from datetime import datetime
from functools import partial
from typing import Any, Final

import anyio
import asyncpg

from ingest.db.sessions import SessionRow, fetch_sessions, is_live
from ingest.errors import FatalError, describe_root
from ingest.runtime.retire import DEFAULT_IDLE, Outcome, retire_sessions
from ingest.settings import CONNECTIONS, FLOW, LIMITS, Settings

__all__ = ["register"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
_LIST_SETTINGS: Final = {"database_url", "db_connect_timeout", "log_level", "log_format"}


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_settings_flags: Callable[[argparse.ArgumentParser, set[str] | None], None],
) -> None:
    """Add ``sessions list`` and ``sessions retire``; ``ingest.cli`` calls
    ``args.handler(args, settings)``."""
    p = sub.add_parser(
        "sessions",
        help="list the MQTT sessions the daemons opened; retire those of workers that are gone",
        description="The persistent MQTT sessions recorded in the database. A session whose "
        "worker is gone keeps its share of a shared subscription queued at the broker until "
        "it is retired (or expires).",
    )
    commands = p.add_subparsers(dest="sessions_command", required=True, metavar="COMMAND")
    ls = commands.add_parser(
        "list",
        help="show the recorded sessions",
        description="Client id, broker, share group, first and last seen, retired, and the "
        "state: live (a worker may be connected), away (its worker is gone) or retired.",
    )
    ls.add_argument("--json", action="store_true", help="one JSON array on stdout")
    ls.add_argument("--config", metavar="FILE", help="TOML file with settings")
    add_settings_flags(ls, _LIST_SETTINGS)
    ls.set_defaults(handler=run_list)

    rt = commands.add_parser(
        "retire",
        help="drain sessions through the pipeline, then end them at the broker",
        description="For each client id: connect with its persistent session, unsubscribe "
        "(the broker adds nothing new), write what the broker had queued for it through the "
        "normal pipeline (acknowledged after commit), and once nothing has arrived for --idle "
        "seconds end the session at the broker and mark it retired. Refuses an unknown client "
        "id (unless --broker) and one that may be live (unless --force).",
    )
    rt.add_argument("client_ids", metavar="CLIENT_ID", nargs="+", help="client ids to retire")
    rt.add_argument(
        "--broker",
        metavar="URL",
        help="the broker holding the sessions, for client ids the sessions table does not "
        "know (default: the table's broker of each)",
    )
    rt.add_argument(
        "--idle",
        metavar="SECONDS",
        type=_positive_float,
        default=DEFAULT_IDLE,
        help=f"seconds without a message after which a session is drained (default {DEFAULT_IDLE:g})",
    )
    rt.add_argument(
        "--force",
        action="store_true",
        help="retire even a session that may be live (its worker would be disconnected)",
    )
    rt.add_argument("--json", action="store_true", help="one JSON array on stdout")
    rt.add_argument("--config", metavar="FILE", help="TOML file with settings")
    add_settings_flags(rt, _retire_settings())
    rt.set_defaults(handler=run_retire)


def _retire_settings() -> set[str]:
    """What retiring uses of the daemon's settings: the broker and how to reach it, the routes,
    the flow and the limits (its client ids are the arguments; it runs one pipeline each)."""
    skip = {"client_id", "workers", "shutdown_timeout", "retire_surplus"}
    return {
        f.name
        for f in fields(Settings)
        if f.metadata["group"] in (CONNECTIONS, FLOW, LIMITS) and f.name not in skip
    } | {"log_level", "log_format"}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError("must be > 0 and under a day")
    return value


# -- list ---------------------------------------------------------------------------------------


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    try:
        rows = anyio.run(_read, settings)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"ingest sessions list: {_db_error(exc)}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps([_row_json(r) for r in rows], indent=2))
    else:
        print(_table(rows))
    return EXIT_OK


async def _read(settings: Settings) -> list[SessionRow]:
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    try:
        return await fetch_sessions(conn)
    finally:
        conn.terminate()


def _db_error(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.UndefinedTableError):
        return "the database has no sessions table: run `ingest migrate` (migration 0007)"
    return f"cannot read the sessions table: {describe_root(exc)}"


def _state(row: SessionRow) -> str:
    if row.retired_at is not None:
        return "retired"
    return "live" if is_live(row) else "away"


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _row_json(row: SessionRow) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "client_id": row.client_id,
        "broker": row.broker,
        "share_group": row.share_group,
        "first_seen": iso(row.first_seen),
        "last_seen": iso(row.last_seen),
        "disconnected_at": iso(row.disconnected_at),
        "retired_at": iso(row.retired_at),
        "state": _state(row),
    }


def _table(rows: list[SessionRow]) -> str:
    if not rows:
        return "no sessions recorded"
    head = ("client id", "broker", "group", "first seen", "last seen", "retired", "state")
    lines = [head] + [
        (
            r.client_id,
            r.broker,
            r.share_group or "-",
            _time(r.first_seen),
            _time(r.last_seen),
            _time(r.retired_at),
            _state(r),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# -- retire -------------------------------------------------------------------------------------


def run_retire(args: argparse.Namespace, settings: Settings) -> int:
    try:
        outcomes = anyio.run(
            partial(
                retire_sessions,
                settings,
                args.client_ids,
                broker=args.broker,
                idle=args.idle,
                force=args.force,
            )
        )
    except FatalError as exc:
        print(f"ingest sessions retire: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps([o.to_json() for o in outcomes], indent=2))
    else:
        for o in outcomes:
            print(_summary(o))
    for o in outcomes:
        if o.error is not None:
            print(f"ingest sessions retire: {o.client_id}: {o.error}", file=sys.stderr)
    return EXIT_OK if all(o.retired for o in outcomes) else EXIT_FAILED


def _summary(o: Outcome) -> str:
    if o.error is not None:
        return f"{o.client_id}: not retired"
    held = "" if o.held_session else " (the broker held no session for it)"
    return (
        f"{o.client_id}: retired at {o.broker}{held}: {o.drained} messages drained in "
        f"{o.drain_seconds:.1f}s ({o.rate:.0f} msg/s), {o.rows} rows written, {o.duplicates} "
        f"duplicates, {o.dead_letters} dead letters; ended after {o.seconds:.1f}s"
    )
