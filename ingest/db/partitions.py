"""Time partitions of ``points`` and ``text_points`` (one per UTC day; the storage behind the
``readings`` and ``text_readings`` views) and ``readings_1m`` (one per UTC month).

The migrations make these tables partitioned by time with a default partition. This module:

- :func:`ensure_partitions` creates the partitions of the coming days (and months) ahead of
  time. A partition is created outside the table and then attached (``ATTACH PARTITION``
  locks the parent in SHARE UPDATE EXCLUSIVE mode, which does not block writers, where
  ``CREATE TABLE ... PARTITION OF`` would lock it exclusively); rows that the default
  partition caught for its range move into it first. A range that overlaps an existing
  partition (``points_legacy`` after an upgrade, a partition made by hand) is left alone.
- :func:`apply_retention` drops the partitions wholly older than the retention
  (``INGEST_RETENTION`` for ``points`` and ``text_points``, ``INGEST_ROLLUP_RETENTION`` for ``readings_1m``,
  usually longer) and deletes the expired rows the default partitions hold, and those of the
  small ``readings_fleet_1m`` (rollup retention).
- :func:`prune` deletes dead letters older than ``INGEST_DEAD_LETTER_RETENTION``, and the
  ``devices``, ``latest_readings`` and ``latest_text`` rows of devices unseen for longer than
  ``INGEST_RETENTION`` (a device that went silent stays visible as silent until then).
- :func:`maintain` runs them once at start and then every hour, for the daemon.

The daemon may run as an ``ingest_writer`` login, which may not issue DDL: partitions are
created and dropped by owner-defined ``SECURITY DEFINER`` functions (migrations/0005_roles.sql,
extended to points and text_points by migrations/0006_series.sql),
called here.

Several instances may run this at once: every change happens under one transaction-level
advisory lock, and with a short ``lock_timeout`` so that a long query holding the parent never
makes writers queue behind us for long (the next round retries).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

import anyio
import asyncpg

from ingest.db.dashboard import describe_error
from ingest.settings import Settings, parse_retention

__all__ = ["Pruned", "apply_retention", "ensure_partitions", "maintain", "prune", "run_once"]

#: Seconds between two maintenance rounds, and after a failed one.
MAINTAIN_INTERVAL = 3600.0
RETRY_INTERVAL = 60.0
#: A round that takes longer is abandoned (a blackholed server) and retried later.
ROUND_TIMEOUT = 1800.0

_ADVISORY_LOCK_KEY = 0x10_7_1_6E_58  # ingest.db.migrate's key + 1
_LOCK_TIMEOUT = "5s"


@dataclass(frozen=True, slots=True)
class _Table:
    """A table partitioned by time; names and storage of its partitions are fixed by
    ``ingest_create_partition`` (migrations/0005_roles.sql)."""

    parent: str
    unit: Literal["day", "month"]

    def ranges(self, first: date, last: date) -> list[tuple[date, date]]:
        """The partition ranges [start, end) that cover the days ``first`` to ``last``."""
        out: list[tuple[date, date]] = []
        start = first if self.unit == "day" else first.replace(day=1)
        while start <= last:
            end = start + timedelta(days=1) if self.unit == "day" else _next_month(start)
            out.append((start, end))
            start = end
        return out


POINTS = _Table("points", "day")
TEXT_POINTS = _Table("text_points", "day")
ROLLUPS = _Table("readings_1m", "month")
#: Tables of raw values, kept for INGEST_RETENTION.
RAW: tuple[_Table, ...] = (POINTS, TEXT_POINTS)

# Bounds of the partitions of a table, as the server reads its own bound expressions back
# (so the session's TimeZone and DateStyle do not matter). NULL stands for MINVALUE/MAXVALUE.
_BOUNDS_SQL = r"""
    SELECT c.relname AS name,
           CASE WHEN b[1] = 'MINVALUE' THEN NULL ELSE btrim(b[1], '''')::timestamptz END AS lo,
           CASE WHEN b[2] = 'MAXVALUE' THEN NULL ELSE btrim(b[2], '''')::timestamptz END AS hi
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                    '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') AS b
    WHERE i.inhparent = $1::text::regclass AND b IS NOT NULL
    ORDER BY lo NULLS FIRST
"""


@dataclass(frozen=True, slots=True)
class _Partition:
    name: str
    lo: datetime | None
    hi: datetime | None

    def overlaps(self, lo: datetime, hi: datetime) -> bool:
        return (self.lo is None or self.lo < hi) and (self.hi is None or lo < self.hi)


async def ensure_partitions(
    conn: asyncpg.Connection[asyncpg.Record], *, days_ahead: int, now: datetime
) -> list[str]:
    """Create the partitions of ``points`` and ``text_points`` for the UTC days from ``now``'s
    to ``days_ahead`` days later, and those of ``readings_1m`` for the months these days fall in. Returns the
    names of the partitions created (none when they all exist)."""
    if days_ahead < 0:
        raise ValueError(f"days_ahead must be >= 0, got {days_ahead!r}")
    first = _utc(now).date()
    last = first + timedelta(days=days_ahead)
    created: list[str] = []
    for table in (*RAW, ROLLUPS):
        async with conn.transaction():
            await _lock(conn)
            existing = await _partitions(conn, table)
            for start, end in table.ranges(first, last):
                lo, hi = _midnight(start), _midnight(end)
                if any(p.overlaps(lo, hi) for p in existing):
                    continue
                # Owner-defined (migrations/0005_roles.sql): an ingest_writer may not do DDL.
                name = await conn.fetchval(
                    "SELECT ingest_create_partition($1::text::regclass, $2)", table.parent, lo
                )
                if name is not None:
                    existing.append(_Partition(name, lo, hi))
                    created.append(name)
    return created


async def apply_retention(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    retention: timedelta | None,
    rollup_retention: timedelta | None,
    now: datetime,
) -> list[str]:
    """Drop the partitions of ``points`` and ``text_points`` whose whole range is older than ``now - retention``
    and those of ``readings_1m`` older than ``now - rollup_retention`` (None: keep forever),
    and delete the expired rows of the default partitions. Returns the partitions dropped."""
    dropped: list[str] = []
    tables = [*((table, retention) for table in RAW), (ROLLUPS, rollup_retention)]
    for table, keep in tables:
        if keep is None:
            continue
        cutoff = _utc(now) - keep
        async with conn.transaction():
            await _lock(conn)
            # Owner-defined (migrations/0005_roles.sql): an ingest_writer may not do DDL.
            rows = await conn.fetch(
                "SELECT ingest_drop_expired($1::text::regclass, $2) AS name", table.parent, cutoff
            )
            dropped.extend(r["name"] for r in rows)
            if table is ROLLUPS:
                # Metrics x minutes: small enough for a DELETE.
                await conn.execute("DELETE FROM readings_fleet_1m WHERE bucket < $1", cutoff)
    return dropped


@dataclass(frozen=True, slots=True)
class Pruned:
    """Rows :func:`prune` deleted: dead letters past their retention, devices (with their
    latest values) unseen for longer than the raw retention, and set-aside dashboard batches
    whose readings expired."""

    dead_letters: int = 0
    devices: int = 0
    set_aside: int = 0

    def __bool__(self) -> bool:
        return bool(self.dead_letters or self.devices or self.set_aside)


#: Dead letters deleted per statement: a first run on a large table never holds one long
#: transaction.
DEAD_LETTER_CHUNK = 10_000
_DELETE_DEAD_LETTERS = """
    WITH gone AS (
        DELETE FROM dead_letters WHERE id IN (
            SELECT id FROM dead_letters WHERE received_at < $1 LIMIT $2
        ) RETURNING 1
    )
    SELECT count(*) FROM gone
"""
# A device is gone once it has not been seen (last_seen, database time) for the raw retention:
# none of its readings are left. A fold of a batch holding it, later, makes it anew.
_PRUNE_DEVICES = """
    WITH gone AS (DELETE FROM devices WHERE last_seen < $1 RETURNING device_id),
    latest AS (DELETE FROM latest_readings l USING gone WHERE l.device_id = gone.device_id),
    texts AS (DELETE FROM latest_text l USING gone WHERE l.device_id = gone.device_id)
    SELECT count(*) FROM gone
"""
_PRUNE_SET_ASIDE = """
    WITH gone AS (DELETE FROM dashboard_failed WHERE max_ts < $1 RETURNING batch),
    staged AS (DELETE FROM dashboard_staged s USING gone WHERE s.batch = gone.batch)
    SELECT count(*) FROM gone
"""


async def prune(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    retention: timedelta | None,
    dead_letter_retention: timedelta | None,
    now: datetime,
) -> Pruned:
    """Delete the dead letters received before ``now - dead_letter_retention``, and the
    ``devices``, ``latest_readings`` and ``latest_text`` rows of devices last seen before ``now - retention``
    (None: keep forever)."""
    dead_letters = devices = set_aside = 0
    if dead_letter_retention is not None:
        cutoff = _utc(now) - dead_letter_retention
        while True:
            deleted = int(await conn.fetchval(_DELETE_DEAD_LETTERS, cutoff, DEAD_LETTER_CHUNK))
            dead_letters += deleted
            if deleted < DEAD_LETTER_CHUNK:
                break
    if retention is not None:
        cutoff = _utc(now) - retention
        async with conn.transaction():
            devices = int(await conn.fetchval(_PRUNE_DEVICES, cutoff))
            set_aside = int(await conn.fetchval(_PRUNE_SET_ASIDE, cutoff))
    return Pruned(dead_letters, devices, set_aside)


@dataclass(frozen=True, slots=True)
class _Retention:
    raw: timedelta | None
    rollups: timedelta | None
    dead_letters: timedelta | None

    @classmethod
    def of(cls, settings: Settings) -> _Retention:
        return cls(
            parse_retention(settings.retention),
            parse_retention(settings.rollup_retention),
            settings.dead_letter_retention,
        )


async def maintain(dsn: str | None, settings: Settings, log: logging.Logger) -> None:
    """Run :func:`ensure_partitions`, :func:`apply_retention` and :func:`prune` now and then
    every hour, forever (the daemon runs it as a task and cancels it at shutdown). A failed
    round (the database away, a lock not granted in time) is logged and retried a minute
    later; it never ends the task."""
    keep = _Retention.of(settings)
    failures = 0
    while True:
        try:
            with anyio.fail_after(ROUND_TIMEOUT):
                created, dropped = await _round(dsn, settings, keep, log)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures += 1
            # Once a minute at most: every failure is worth a line.
            log.warning(
                "partition maintenance failed (%d in a row), retrying in %.0fs: %s",
                failures,
                RETRY_INTERVAL,
                describe_error(exc),
            )
            await anyio.sleep(RETRY_INTERVAL)
            continue
        failures = 0
        if created:
            log.info("partitions created: %s", ", ".join(created))
        if dropped:
            log.info("partitions dropped (retention): %s", ", ".join(dropped))
        await anyio.sleep(MAINTAIN_INTERVAL)


async def run_once(
    dsn: str | None, settings: Settings, log: logging.Logger | None = None
) -> tuple[list[str], list[str]]:
    """One round of :func:`maintain` (partitions ahead, retention); the daemon runs it before
    it starts writing, so the first rows of a new installation never race the creation of
    their day's partition (rows routed to the default partition while it is being split
    fail with a partition-constraint violation). Returns the partitions created and dropped;
    what :func:`prune` deleted is logged on ``log``."""
    return await _round(
        dsn, settings, _Retention.of(settings), log or logging.getLogger("ingest.partitions")
    )


async def _round(
    dsn: str | None, settings: Settings, keep: _Retention, log: logging.Logger
) -> tuple[list[str], list[str]]:
    conn = await asyncpg.connect(
        dsn,
        timeout=settings.db_connect_timeout,
        server_settings={"application_name": "iot-ingest partitions"},
    )
    try:
        now = datetime.now(UTC)
        created = await ensure_partitions(conn, days_ahead=settings.partition_days_ahead, now=now)
        dropped = await apply_retention(
            conn, retention=keep.raw, rollup_retention=keep.rollups, now=now
        )
        pruned = await prune(
            conn, retention=keep.raw, dead_letter_retention=keep.dead_letters, now=now
        )
        await conn.close(timeout=settings.db_connect_timeout)
    except BaseException:
        # Cancelled, timed out or failed: do not wait on a server that may not answer.
        conn.terminate()
        raise
    if pruned:
        log.info(
            "pruned (retention): %d dead letters, %d devices unseen with their latest values,"
            " %d set-aside dashboard batches",
            pruned.dead_letters,
            pruned.devices,
            pruned.set_aside,
        )
    return created, dropped


async def _lock(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK_KEY)


async def _partitions(conn: asyncpg.Connection[asyncpg.Record], table: _Table) -> list[_Partition]:
    rows = await conn.fetch(_BOUNDS_SQL, table.parent)
    return [_Partition(r["name"], r["lo"], r["hi"]) for r in rows]


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return moment.astimezone(UTC)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)
