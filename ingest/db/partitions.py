"""Time partitions of ``readings`` (one per UTC day) and ``readings_1m`` (one per UTC month).

The migrations make both tables partitioned by time with a default partition. This module:

- :func:`ensure_partitions` creates the partitions of the coming days (and months) ahead of
  time. A partition is created outside the table and then attached (``ATTACH PARTITION``
  locks the parent in SHARE UPDATE EXCLUSIVE mode, which does not block writers, where
  ``CREATE TABLE ... PARTITION OF`` would lock it exclusively); rows that the default
  partition caught for its range move into it first. A range that overlaps an existing
  partition (``readings_legacy`` after an upgrade, a partition made by hand) is left alone.
- :func:`apply_retention` drops the partitions wholly older than the retention
  (``INGEST_RETENTION`` for ``readings``, ``INGEST_ROLLUP_RETENTION`` for ``readings_1m``,
  usually longer) and deletes the expired rows the default partitions hold, and those of the
  small ``readings_fleet_1m`` (rollup retention). ``devices`` and
  ``latest_readings`` are never pruned: a device that went silent stays visible as silent.
- :func:`maintain` runs both once at start and then every hour, for the daemon.

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

from ingest.settings import Settings, parse_retention

__all__ = ["apply_retention", "ensure_partitions", "maintain", "run_once"]

#: Seconds between two maintenance rounds, and after a failed one.
MAINTAIN_INTERVAL = 3600.0
RETRY_INTERVAL = 60.0
#: A round that takes longer is abandoned (a blackholed server) and retried later.
ROUND_TIMEOUT = 1800.0

_ADVISORY_LOCK_KEY = 0x10_7_1_6E_58  # ingest.db.migrate's key + 1
_LOCK_TIMEOUT = "5s"


@dataclass(frozen=True, slots=True)
class _Table:
    parent: str
    column: str
    unit: Literal["day", "month"]
    prefix: str
    storage: str = ""

    def name(self, start: date) -> str:
        stamp = start.strftime("%Y%m%d" if self.unit == "day" else "%Y%m")
        return f"{self.prefix}{stamp}"

    def ranges(self, first: date, last: date) -> list[tuple[date, date]]:
        """The partition ranges [start, end) that cover the days ``first`` to ``last``."""
        out: list[tuple[date, date]] = []
        start = first if self.unit == "day" else first.replace(day=1)
        while start <= last:
            end = start + timedelta(days=1) if self.unit == "day" else _next_month(start)
            out.append((start, end))
            start = end
        return out


READINGS = _Table("readings", "ts", "day", "readings_p")
# Rollup rows are updated by every batch of their minute: room on the page for HOT updates.
ROLLUPS = _Table("readings_1m", "bucket", "month", "readings_1m_p", " WITH (fillfactor = 70)")

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
_DEFAULT_SQL = """
    SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = $1::text::regclass AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
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
    """Create the partitions of ``readings`` for the UTC days from ``now``'s to ``days_ahead``
    days later, and those of ``readings_1m`` for the months these days fall in. Returns the
    names of the partitions created (none when they all exist)."""
    if days_ahead < 0:
        raise ValueError(f"days_ahead must be >= 0, got {days_ahead!r}")
    first = _utc(now).date()
    last = first + timedelta(days=days_ahead)
    created: list[str] = []
    for table in (READINGS, ROLLUPS):
        async with conn.transaction():
            await _lock(conn)
            existing = await _partitions(conn, table)
            default = await conn.fetchval(_DEFAULT_SQL, table.parent)
            for start, end in table.ranges(first, last):
                lo, hi = _midnight(start), _midnight(end)
                if any(p.overlaps(lo, hi) for p in existing):
                    continue
                await _create(conn, table, table.name(start), lo, hi, default)
                existing.append(_Partition(table.name(start), lo, hi))
                created.append(table.name(start))
    return created


async def apply_retention(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    retention: timedelta | None,
    rollup_retention: timedelta | None,
    now: datetime,
) -> list[str]:
    """Drop the partitions of ``readings`` whose whole range is older than ``now - retention``
    and those of ``readings_1m`` older than ``now - rollup_retention`` (None: keep forever),
    and delete the expired rows of the default partitions. Returns the partitions dropped."""
    dropped: list[str] = []
    for table, keep in ((READINGS, retention), (ROLLUPS, rollup_retention)):
        if keep is None:
            continue
        cutoff = _utc(now) - keep
        async with conn.transaction():
            await _lock(conn)
            for p in await _partitions(conn, table):
                if p.hi is not None and p.hi <= cutoff:
                    # Locks the parent exclusively, for as long as the drop takes (moments).
                    await conn.execute(f"DROP TABLE {_ident(p.name)}")
                    dropped.append(p.name)
            default = await conn.fetchval(_DEFAULT_SQL, table.parent)
            if default is not None:
                await conn.execute(
                    f"DELETE FROM {_ident(default)} WHERE {table.column} < $1", cutoff
                )
            if table is ROLLUPS:
                # Metrics x minutes: small enough for a DELETE.
                await conn.execute("DELETE FROM readings_fleet_1m WHERE bucket < $1", cutoff)
    return dropped


async def maintain(dsn: str | None, settings: Settings, log: logging.Logger) -> None:
    """Run :func:`ensure_partitions` and :func:`apply_retention` now and then every hour,
    forever (the daemon runs it as a task and cancels it at shutdown). A failed round (the
    database away, a lock not granted in time) is logged and retried a minute later; it never
    ends the task."""
    retention = parse_retention(settings.retention)
    rollup_retention = parse_retention(settings.rollup_retention)
    failures = 0
    while True:
        try:
            with anyio.fail_after(ROUND_TIMEOUT):
                created, dropped = await _round(
                    dsn, settings, retention=retention, rollup_retention=rollup_retention
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures += 1
            log_at = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
            log.log(
                log_at,
                "partition maintenance failed (%d in a row), retrying in %.0fs: %s: %s",
                failures,
                RETRY_INTERVAL,
                type(exc).__name__,
                exc,
            )
            await anyio.sleep(RETRY_INTERVAL)
            continue
        failures = 0
        if created:
            log.info("partitions created: %s", ", ".join(created))
        if dropped:
            log.info("partitions dropped (retention): %s", ", ".join(dropped))
        await anyio.sleep(MAINTAIN_INTERVAL)


async def run_once(dsn: str | None, settings: Settings) -> tuple[list[str], list[str]]:
    """One round of :func:`maintain` (partitions ahead, retention); the daemon runs it before
    it starts writing, so the first rows of a new installation never race the creation of
    their day's partition (rows routed to the default partition while it is being split
    fail with a partition-constraint violation)."""
    return await _round(
        dsn,
        settings,
        retention=parse_retention(settings.retention),
        rollup_retention=parse_retention(settings.rollup_retention),
    )


async def _round(
    dsn: str | None,
    settings: Settings,
    *,
    retention: timedelta | None,
    rollup_retention: timedelta | None,
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
            conn, retention=retention, rollup_retention=rollup_retention, now=now
        )
        await conn.close(timeout=settings.db_connect_timeout)
    except BaseException:
        # Cancelled, timed out or failed: do not wait on a server that may not answer.
        conn.terminate()
        raise
    return created, dropped


async def _lock(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _ADVISORY_LOCK_KEY)


async def _partitions(conn: asyncpg.Connection[asyncpg.Record], table: _Table) -> list[_Partition]:
    rows = await conn.fetch(_BOUNDS_SQL, table.parent)
    return [_Partition(r["name"], r["lo"], r["hi"]) for r in rows]


async def _create(
    conn: asyncpg.Connection[asyncpg.Record],
    table: _Table,
    name: str,
    lo: datetime,
    hi: datetime,
    default: str | None,
) -> None:
    parent, ident = _ident(table.parent), _ident(name)
    # Indexes are left out: ATTACH builds the parent's on the partition (after the move).
    await conn.execute(
        f"CREATE TABLE {ident} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        f"{table.storage}"
    )
    if default is not None:
        # Writers that would route rows of this range to the default partition wait until
        # commit, so none is left behind there (ATTACH would then fail).
        await conn.execute(f"LOCK TABLE {_ident(default)} IN ACCESS EXCLUSIVE MODE")
        await conn.execute(
            f"WITH moved AS (DELETE FROM {_ident(default)}"
            f" WHERE {table.column} >= $1 AND {table.column} < $2 RETURNING *)"
            f" INSERT INTO {ident} SELECT * FROM moved",
            lo,
            hi,
        )
    await conn.execute(
        f"ALTER TABLE {parent} ATTACH PARTITION {ident}"
        f" FOR VALUES FROM ({_literal(lo)}) TO ({_literal(hi)})"
    )


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return moment.astimezone(UTC)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(moment: datetime) -> str:
    # Bounds are DDL (no parameters): an ISO 8601 literal with its UTC offset.
    return f"'{moment.isoformat()}'"
