"""``ingest replay``: re-decode dead letters and store those that decode now, as the daemon would.

After a decoder fix or a route change, dead letters are decoded again, oldest first (by id), in
batches, and those that decode now are written through the daemon's writer code
(:func:`ingest.flow.writer.store`): their numeric readings into ``points``, text readings into
``text_points``, their tags, status and units on ``devices`` and ``series``, and a dashboard
batch, so the dashboard tables see them after the next fold. Per batch:

1. the series of every candidate's readings, texts and units are found or created first
   (:func:`ingest.flow.writer.batch_series`, committed on their own, as the writer does: a
   series never points at a rolled-back row);
2. one transaction: ``DELETE FROM dead_letters WHERE id = ANY(...) RETURNING id`` for the ones
   that decode now, and only the messages of the rows this transaction deleted are stored (a
   concurrent replay that got there first holds the row lock, and this one then sees nothing to
   move), conflict-safe (``ON CONFLICT (series_id, ts) DO NOTHING``): readings already stored
   stay as they are (the first write wins) and are counted as already present.

Dead letters that still fail to decode are never touched (error text and reason kept). When
the database rejects a batch's rows (SQLSTATE class 22/23/54, ``ingest.flow.classify`` ROW), that
batch is redone one dead letter per transaction, and the ones still rejected stay.

Idempotent: a second run finds only dead letters that still fail, and changes nothing.
``--dry-run`` reads only (no locks, no writes): it decodes, and counts which readings are
already stored; what the database would still reject is only found by a real run.

Sparkplug: the births stored in ``sparkplug_births`` (``ingest.flow.births``) are decoded
first, so an ``unknown_alias`` dead letter decodes by the tables of its node's newest birth.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, Final, NamedTuple

import anyio
import asyncpg

from ingest.errors import ConfigError, DecodeError
from ingest.flow.births import restore_births
from ingest.flow.classify import ErrorClass, classify
from ingest.flow.series import DeviceMemory, SeriesCache
from ingest.flow.writer import Batch, batch_series, store
from ingest.formats.decode import RouteTable, decode, load_routes
from ingest.formats.limits import DEFAULT_LIMITS, Limits
from ingest.model import Decoded, Reading, TextReading
from ingest.settings import Settings
from ingest.tools.audit import parse_time
from ingest.tools.audit.output import visible

__all__ = ["ReplaySummary", "register", "replay"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_CONFIG: Final = 2
DEFAULT_BATCH: Final = 500

MOVED: Final = "moved"
REJECTED: Final = "rejected"
GONE: Final = "gone (moved by another replay)"
#: Rejections whose database message is kept for the summary.
_KEEP_ERRORS: Final = 5

#: Series ids a replay keeps in memory (ingest.flow.series.SeriesCache).
_SERIES_CACHE: Final = 100_000
_DELETE_SQL = "DELETE FROM dead_letters WHERE id = ANY($1::bigint[]) RETURNING id"
_PRESENT_SQL = """
    SELECT count(*) FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS u(device_id, metric, ts)
    JOIN {view} r USING (device_id, metric, ts)
"""


class _Candidate(NamedTuple):
    """A dead letter that decodes now."""

    id: int
    reason: str
    decoded: Decoded


@dataclass(slots=True)
class ReplaySummary:
    """What a replay did (or, with ``dry_run``, would do).

    ``outcomes`` counts dead letters by ``(old reason, outcome)``: ``moved``, ``rejected``
    (the database still refuses its rows), or the reason it still fails to decode.
    """

    dry_run: bool
    examined: int = 0
    moved: int = 0
    readings_inserted: int = 0
    readings_present: int = 0
    still_failing: int = 0
    rejected: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejection_errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "examined": self.examined,
            "moved": self.moved,
            "readings_inserted": self.readings_inserted,
            "readings_present": self.readings_present,
            "still_failing": self.still_failing,
            "rejected": self.rejected,
            "outcomes": [
                {"reason": reason, "outcome": outcome, "count": n}
                for (reason, outcome), n in sorted(self.outcomes.items())
            ],
            "rejection_errors": self.rejection_errors,
        }

    def format(self) -> str:
        verb = "would move" if self.dry_run else "moved"
        lines = [
            f"replay: examined {self.examined:,} dead letters"
            + (" (dry run: nothing changed)" if self.dry_run else "")
        ]
        if self.outcomes:
            width = max(len(reason) for reason, _ in self.outcomes)
            for (reason, outcome), n in sorted(self.outcomes.items()):
                shown = verb if outcome == MOVED else outcome
                if outcome not in (MOVED, REJECTED, GONE):
                    shown = f"still {outcome}"
                lines.append(f"  {reason.ljust(width)} -> {shown:<24} {n:>10,}")
        lines.append(
            f"{verb} {self.moved:,} dead letters: {self.readings_inserted:,} readings "
            f"{'to insert' if self.dry_run else 'inserted'}, {self.readings_present:,} already "
            f"present; {self.still_failing:,} still fail to decode"
            + ("" if self.dry_run else f"; {self.rejected:,} rejected by the database")
        )
        lines.extend(f"  rejected: {e}" for e in self.rejection_errors)
        # Reasons and the database's errors may quote what a device sent.
        return "\n".join(visible(line) for line in lines)


def _columns(
    readings: Sequence[Reading | TextReading],
) -> tuple[list[str], list[str], list[datetime]]:
    return [r.device_id for r in readings], [r.metric for r in readings], [r.ts for r in readings]


async def _move(
    conn: asyncpg.Connection[asyncpg.Record], cache: SeriesCache, batch: Sequence[_Candidate]
) -> tuple[set[int], int, int]:
    """Delete the dead letters and store their messages, in one transaction, as the daemon's
    writer stores a batch (module docstring). Returns (ids of the dead letters moved, readings
    inserted, readings already present), text readings counted as readings."""
    # Committed before the transaction, as the writer does (ingest.flow.series).
    await batch_series(conn, cache, Batch.of(c.decoded for c in batch))
    async with conn.transaction():
        deleted = {r["id"] for r in await conn.fetch(_DELETE_SQL, [c.id for c in batch])}
        moving = Batch.of(c.decoded for c in batch if c.id in deleted)
        if not moving:
            return deleted, 0, 0
        ids, _ = await batch_series(conn, cache, moving)  # the cache has them now
        # A memory of its own: every tag, status and unit of the messages is written.
        plan = DeviceMemory(1).plan(moving.updates)
        inserted = await store(conn, moving, ids, plan, conflict_safe=True)
    return deleted, inserted, len(moving.rows) + len(moving.texts) - inserted


async def replay(
    dsn: str | None,
    *,
    routes: RouteTable,
    dry_run: bool = False,
    since: datetime | None = None,
    reasons: Sequence[str] = (),
    limit: int | None = None,
    batch: int = DEFAULT_BATCH,
    connect_timeout: float = 10.0,
    on_batch: Callable[[ReplaySummary], None] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ReplaySummary:
    """Replay dead letters (module docstring). ``limit`` caps the dead letters examined."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    summary = ReplaySummary(dry_run=dry_run)
    seen_keys: set[tuple[str, str, str, datetime]] = set()  # dry run: readings counted already
    cache = SeriesCache(_SERIES_CACHE)
    conn = await asyncpg.connect(dsn, timeout=connect_timeout)
    try:
        await restore_births(conn, routes, limits)  # Sparkplug: data by alias decodes
        last_id = 0
        while limit is None or summary.examined < limit:
            size = batch if limit is None else min(batch, limit - summary.examined)
            sql, params = _select(last_id, since, reasons, size)
            rows = await conn.fetch(sql, *params)
            if not rows:
                break
            last_id = rows[-1]["id"]
            summary.examined += len(rows)
            candidates = _decode(rows, routes, limits, summary)
            if candidates:
                if dry_run:
                    await _dry_run(conn, candidates, summary, seen_keys)
                else:
                    await _move_batch(conn, cache, candidates, summary)
            if on_batch is not None:
                on_batch(summary)
    finally:
        await conn.close()
    return summary


def _select(
    after_id: int, since: datetime | None, reasons: Sequence[str], size: int
) -> tuple[str, list[Any]]:
    """The next ``size`` dead letters after ``after_id`` (oldest first), with the filters."""
    params: list[Any] = [after_id]
    sql = "SELECT id, received_at, topic, payload, reason FROM dead_letters WHERE id > $1"
    if since is not None:
        params.append(since)
        sql += f" AND received_at >= ${len(params)}"
    if reasons:
        params.append(list(reasons))
        sql += f" AND reason = ANY(${len(params)}::text[])"
    params.append(size)
    return sql + f" ORDER BY id LIMIT ${len(params)}", params


def _decode(
    rows: Sequence[asyncpg.Record], routes: RouteTable, limits: Limits, summary: ReplaySummary
) -> list[_Candidate]:
    """The dead letters that decode now; those that still fail are counted in ``summary``."""
    candidates: list[_Candidate] = []
    for r in rows:
        result = decode(r["topic"], bytes(r["payload"]), r["received_at"], routes, limits=limits)
        if isinstance(result, DecodeError):
            summary.still_failing += 1
            summary.outcomes[(r["reason"], result.reason)] += 1
        else:
            candidates.append(_Candidate(r["id"], r["reason"], result))
    return candidates


async def _dry_run(
    conn: asyncpg.Connection[asyncpg.Record],
    candidates: Sequence[_Candidate],
    summary: ReplaySummary,
    seen: set[tuple[str, str, str, datetime]],
) -> None:
    for c in candidates:
        summary.moved += 1
        summary.outcomes[(c.reason, MOVED)] += 1
    for view, rows in (
        ("readings", [r for c in candidates for r in c.decoded.readings]),
        ("text_readings", [r for c in candidates for r in c.decoded.texts]),
    ):
        fresh: list[Reading | TextReading] = []
        for r in rows:
            key = (view, r.device_id, r.metric, r.ts)
            if key in seen:
                summary.readings_present += 1  # an earlier dead letter of this run stores it
            else:
                seen.add(key)
                fresh.append(r)
        present = 0
        if fresh:
            present = await conn.fetchval(_PRESENT_SQL.format(view=view), *_columns(fresh))
        summary.readings_inserted += len(fresh) - present
        summary.readings_present += present


async def _move_batch(
    conn: asyncpg.Connection[asyncpg.Record],
    cache: SeriesCache,
    candidates: Sequence[_Candidate],
    summary: ReplaySummary,
) -> None:
    try:
        outcomes = [(candidates, await _move(conn, cache, candidates))]
    except Exception as exc:
        if classify(exc) is not ErrorClass.ROW:
            raise
        # Some rows are refused: find which, one dead letter per transaction.
        outcomes = []
        for c in candidates:
            try:
                outcomes.append(([c], await _move(conn, cache, [c])))
            except Exception as one_exc:
                if classify(one_exc) is not ErrorClass.ROW:
                    raise
                summary.rejected += 1
                summary.outcomes[(c.reason, REJECTED)] += 1
                if len(summary.rejection_errors) < _KEEP_ERRORS:
                    summary.rejection_errors.append(f"dead letter {c.id}: {one_exc}")
    for group, (moved, inserted, present) in outcomes:
        summary.moved += len(moved)
        summary.readings_inserted += inserted
        summary.readings_present += present
        for c in group:
            # Not deleted by us: a concurrent replay moved it first.
            summary.outcomes[(c.reason, MOVED if c.id in moved else GONE)] += 1


# --- command line ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_settings_flags: Callable[[argparse.ArgumentParser, set[str] | None], None],
) -> None:
    """Add the ``replay`` subcommand; ``ingest.cli`` calls ``args.handler(args, settings)``."""
    p = sub.add_parser(
        "replay",
        help="re-decode dead letters and store those that decode now, as the daemon would",
        description="Re-decode dead letters with the current decoder and route table; store "
        "those that decode (readings, text readings, device tags/status/units, the dashboard "
        "batch; readings already stored keep their value) and delete them, one transaction "
        "per batch. Dead letters that still fail are left as they are. Idempotent.",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would happen, change nothing")
    p.add_argument("--since", metavar="TIME", help="only dead letters received since TIME")
    p.add_argument(
        "--reason",
        metavar="R",
        nargs="+",
        action="extend",
        default=[],
        help="only dead letters with these reasons (not_json, bad_topic, ...)",
    )
    p.add_argument(
        "--limit", metavar="N", type=_positive_int, help="examine at most N dead letters"
    )
    p.add_argument(
        "--batch",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_BATCH,
        help=f"dead letters per transaction (default {DEFAULT_BATCH})",
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


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = parse_time(args.since, setting="--since") if args.since else None
        routes = load_routes(settings)
    except ConfigError as exc:
        print(f"ingest: configuration error: {visible(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        summary = anyio.run(
            partial(
                replay,
                settings.database_url,
                routes=routes,
                limits=Limits.from_settings(settings),
                dry_run=args.dry_run,
                since=since,
                reasons=args.reason,
                limit=args.limit,
                batch=args.batch,
                connect_timeout=settings.db_connect_timeout,
            )
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Every committed batch is complete (readings in, dead letters out); rerunning is safe.
        print(
            f"ingest replay: database error, stopped (committed batches stay; rerun to "
            f"continue): {type(exc).__name__}: {visible(str(exc))}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary.to_json(), separators=(",", ":")))
    else:
        print(summary.format())
    return EXIT_OK
