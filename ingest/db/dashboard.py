"""The dashboard tables: ``devices``, ``latest_readings``, ``readings_1m``, ``readings_fleet_1m``
(README, "Querying the data"), maintained exactly once from the rows a batch actually inserted.

Two ways, chosen with the writer's ``dashboard`` argument:

- ``"deferred"`` (the default): the batch's transaction only records the batch. The writer sets
  ``ingest.batch`` (a number from ``dashboard_batch_seq``) so that every row it inserts carries
  it in ``readings.batch`` (a column default), and inserts a ``dashboard_pending`` row with the
  batch's device-time range. :func:`fold` later claims pending batches (``FOR UPDATE SKIP
  LOCKED``), reads their rows back (BRIN index on ``batch``, partitions pruned by the time
  range), upserts the dashboard tables and deletes the pending rows, all in one transaction:
  each committed batch is applied once, a rolled-back batch (a rejected row, bisection) never
  is, and duplicates were never inserted. :func:`fold_forever` runs it every
  ``INGEST_DASHBOARD_INTERVAL`` seconds in the daemon, so dashboards lag by about that much.
  The write path pays a few percent; the upserts cost one row per (device, metric, minute),
  (device, metric) and device *per fold*, not per batch.
- ``"inline"``: the same upserts in the batch's own transaction (see ``ingest.flow.writer``). No lag,
  but the write path pays them on every batch: several times the cost of the insert itself
  when each batch holds about one sample per device and metric (benchmarks/dashboard.py).

Either way the upserts read their input sorted by key, so concurrent writers and folders take
row locks in one order and never deadlock on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final, Literal

import anyio
import asyncpg

from ingest.settings import Settings

__all__ = ["PLANNER_SETTINGS", "DashboardMode", "FoldResult", "fold", "fold_forever", "upsert_ctes"]

DashboardMode = Literal["deferred", "inline", "off"]

#: Pending batches one fold applies at most (a backlog is worked off fold after fold).
FOLD_MAX_BATCHES: Final = 100
#: Seconds before a folder that lost its connection tries again.
RETRY_INTERVAL: Final = 5.0
#: A fold that takes longer is abandoned (a blackholed server) and retried.
FOLD_TIMEOUT: Final = 600.0

_BUCKET = "date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00')"


def upsert_ctes(rows: str, *, devices: str) -> str:
    """The CTEs (starting with a comma) that add the rows of relation ``rows`` (columns
    device_id, metric, ts, value) to the dashboard tables. ``devices``: a SELECT of
    (device_id, first_seen, last_seen, last_ts), one row per device of ``rows``.

    ``rows`` is read twice: for the per-minute aggregate (from which the fleet rollups and the
    newest time of each device and metric come too), and to fetch the values at those newest
    times with a hash join on the key. (Sorting every row for a ``DISTINCT ON`` instead was over half of a fold's time.) Run it
    with ``enable_nestloop`` off (:data:`PLANNER_SETTINGS`): the planner cannot estimate
    ``rows`` and would pick a nested loop, one pass over ``rows`` per key. Every upsert reads
    its input grouped (no key twice in one statement) and sorted by key (lock ordering);
    buckets are UTC minutes whatever the session time zone."""
    return f"""
, agg AS (
    SELECT device_id, metric, {_BUCKET} AS bucket,
           count(*)::integer AS n, sum(value) AS sum, min(value) AS min, max(value) AS max,
           max(ts) AS last_ts
    FROM {rows} GROUP BY 1, 2, 3
), rollup AS (
    INSERT INTO readings_1m AS r (device_id, metric, bucket, n, sum, min, max)
    SELECT device_id, metric, bucket, n, sum, min, max FROM agg ORDER BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE
    SET n = r.n + excluded.n, sum = r.sum + excluded.sum,
        min = least(r.min, excluded.min), max = greatest(r.max, excluded.max)
), fleet AS (
    INSERT INTO readings_fleet_1m AS f (metric, bucket, n, sum, min, max)
    SELECT metric, bucket, sum(n), sum(sum), min(min), max(max)
    FROM agg GROUP BY 1, 2 ORDER BY 2, 1
    ON CONFLICT (bucket, metric) DO UPDATE
    SET n = f.n + excluded.n, sum = f.sum + excluded.sum,
        min = least(f.min, excluded.min), max = greatest(f.max, excluded.max)
), latest AS (
    INSERT INTO latest_readings AS l (device_id, metric, ts, value)
    SELECT DISTINCT ON (r.device_id, r.metric) r.device_id, r.metric, r.ts, r.value
    FROM (SELECT device_id, metric, max(last_ts) AS ts FROM agg GROUP BY 1, 2) newest
    JOIN {rows} r
      ON r.device_id = newest.device_id AND r.metric = newest.metric AND r.ts = newest.ts
    -- one row per key even if rows held a key twice (a batch that will fail on its insert)
    ORDER BY r.device_id, r.metric
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value
    -- by device timestamp: a late or redelivered sample never replaces a newer one
    WHERE excluded.ts > l.ts
), seen AS (
    INSERT INTO devices AS d (device_id, first_seen, last_seen, last_ts)
    {devices}
    ON CONFLICT (device_id) DO UPDATE
    SET last_seen = greatest(d.last_seen, excluded.last_seen),
        last_ts = greatest(d.last_ts, excluded.last_ts)
)
"""


#: Run by the writer in a deferred-mode batch transaction before its rows: $1, $2 = the least
#: and greatest device timestamps of the batch. ``set_config(..., true)`` lasts until commit.
BEGIN_BATCH_SQL: Final = """
    WITH b AS (
        INSERT INTO dashboard_pending (batch, min_ts, max_ts)
        VALUES (nextval('dashboard_batch_seq'), $1, $2)
        RETURNING batch
    )
    SELECT set_config('ingest.batch', batch::text, true) FROM b
"""

# Committed batches only (a writer's pending row is invisible until it commits), oldest first;
# a concurrent folder skips the ones this one holds instead of waiting for them. The CTE runs
# once: as an IN (subquery) the planner may rescan it per row and claim more than $1.
_CLAIM_SQL = """
    WITH claim AS MATERIALIZED (
        SELECT batch FROM dashboard_pending ORDER BY batch LIMIT $1 FOR UPDATE SKIP LOCKED
    )
    DELETE FROM dashboard_pending p USING claim c WHERE p.batch = c.batch
    RETURNING p.batch, p.stored_at, p.min_ts, p.max_ts
"""
# $1/$2: the claimed batches and when each was stored; $3..$6: their batch and time ranges,
# which let the BRIN index on batch and partition pruning find the rows without a full scan.
# A device's first/last seen: when the first/last claimed batch holding it was stored.
_APPLY_SQL = (
    """
WITH batch_rows AS (
    SELECT device_id, metric, ts, value, batch FROM readings
    WHERE batch = ANY ($1::bigint[]) AND batch BETWEEN $3 AND $4 AND ts BETWEEN $5 AND $6
)"""
    + upsert_ctes(
        "batch_rows",
        devices="""SELECT s.device_id, min(p.stored_at), max(p.stored_at), max(s.last_ts)
    FROM (SELECT device_id, batch, max(ts) AS last_ts FROM batch_rows GROUP BY 1, 2) s
    JOIN unnest($1::bigint[], $2::timestamptz[]) AS p (batch, stored_at) USING (batch)
    GROUP BY s.device_id ORDER BY s.device_id""",
    )
    + "SELECT count(*) FROM batch_rows"
)
#: For the statements built with :func:`upsert_ctes`, scoped to their transaction.
PLANNER_SETTINGS: Final = "SET LOCAL enable_nestloop = off; SET LOCAL enable_mergejoin = off"
# Scoped to the fold's transaction: sorts of a fold's rows stay in memory, and the planner,
# which cannot know that the newest batch numbers are few, never scans a whole partition.
_FOLD_SETTINGS = f"SET LOCAL work_mem = '64MB'; SET LOCAL enable_seqscan = off; {PLANNER_SETTINGS}"


@dataclass(frozen=True, slots=True)
class FoldResult:
    """What one :func:`fold` applied: pending batches, and the readings rows they held."""

    batches: int = 0
    rows: int = 0


async def fold(
    conn: asyncpg.Connection[asyncpg.Record], *, max_batches: int = FOLD_MAX_BATCHES
) -> FoldResult:
    """Apply up to ``max_batches`` committed pending batches to the dashboard tables, in one
    transaction (see the module docstring). Safe to run from several connections at once."""
    async with conn.transaction():
        claimed = await conn.fetch(_CLAIM_SQL, max_batches)
        if not claimed:
            return FoldResult()
        await conn.execute(_FOLD_SETTINGS)
        batches = [r["batch"] for r in claimed]
        rows = await conn.fetchval(
            _APPLY_SQL,
            batches,
            [r["stored_at"] for r in claimed],
            min(batches),
            max(batches),
            min(r["min_ts"] for r in claimed),
            max(r["max_ts"] for r in claimed),
        )
    return FoldResult(batches=len(batches), rows=int(rows))


async def fold_forever(dsn: str | None, settings: Settings, log: logging.Logger) -> None:
    """Fold pending batches every ``settings.dashboard_interval`` seconds (at once again while
    a backlog remains), forever: the daemon runs it as a task and cancels it at shutdown.
    Whatever is still pending then is folded by the next run (or by another instance). Losing
    the database is logged and retried, never fatal."""
    failures = 0
    while True:
        try:
            conn = await asyncpg.connect(
                dsn,
                timeout=settings.db_connect_timeout,
                server_settings={"application_name": "iot-ingest dashboard"},
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            failures = _failed(log, failures, exc)
            await anyio.sleep(RETRY_INTERVAL)
            continue
        try:
            while True:
                with anyio.fail_after(FOLD_TIMEOUT):
                    result = await fold(conn)
                failures = 0
                if result.batches < FOLD_MAX_BATCHES:
                    await anyio.sleep(settings.dashboard_interval)
        except (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            failures = _failed(log, failures, exc)
        finally:
            # Cancelled or failed: never wait on a server that may not answer.
            conn.terminate()
        await anyio.sleep(RETRY_INTERVAL)


def _failed(log: logging.Logger, failures: int, exc: BaseException) -> int:
    failures += 1
    level = logging.WARNING if failures == 1 or failures % 20 == 0 else logging.DEBUG
    log.log(
        level,
        "dashboard fold failed (%d in a row), retrying in %.0fs: %s: %s",
        failures,
        RETRY_INTERVAL,
        type(exc).__name__,
        exc,
    )
    return failures
