"""The dashboard tables: ``devices``, ``latest_readings``, ``latest_text``, ``readings_1m``,
``readings_fleet_1m`` (README, "Querying the data"), maintained exactly once from the rows a
batch actually inserted into ``points`` and ``text_points``.

Deferred, never in the batch's transaction: the batch's transaction only records the batch. The
  writer takes a number from ``dashboard_batch_seq`` that every row it inserts carries in
  ``points.batch`` / ``text_points.batch``, and inserts a ``dashboard_pending`` row with the
  batch's device-time range. A batch copied straight into ``points`` (every row inserted)
  whose readings are at least two per series and minute on average also writes its
  aggregates into ``dashboard_staged``: a row per series and UTC minute of numeric readings
  (count, sum, min, max, the newest reading) and a row per series of text readings (count,
  the newest), computed by the writer. :func:`fold` later claims pending batches
  (``FOR UPDATE SKIP LOCKED``), takes the staged rows of those that have them, reads the rows
  of the others back (BRIN index on ``batch``, partitions pruned by the time range), names
  their series (one probe of ``series`` per series, not per row), upserts the dashboard tables
  and deletes the pending and staged rows, all in one transaction: each committed batch is
  applied once, a rolled-back batch (a rejected row, bisection) never is, and duplicates were
  never inserted. A :class:`Folder` runs it every ``INGEST_DASHBOARD_INTERVAL`` seconds in the
  daemon, so dashboards lag by about that much. The write path pays a few percent; the
  upserts cost one row per (device, metric, minute), (device, metric) and device *per fold*,
  not per batch (doing them in the batch's own transaction instead cost several times the
  insert itself: benchmarks/dashboard.py).

The upserts read their input sorted by key, so concurrent writers and folders take
row locks in one order and never deadlock on them.

No value can wedge the fold (docs/design.md, "Limits"): the rollups' sums saturate at
+/-1.7976931348623157e308 instead of overflowing (values of magnitude 1e290 or more are summed in
numeric, with the 15 significant digits PostgreSQL keeps of a double). A batch that still cannot
be folded (a constraint or trigger added by hand rejects its rows) is set aside in
``dashboard_failed`` (its staged rows kept) and every other batch is folded; see :func:`fold`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import anyio
import asyncpg

from ingest.model import DashboardStatistics
from ingest.settings import Settings

__all__ = [
    "BEGIN_BATCH_SQL",
    "PLANNER_SETTINGS",
    "FoldResult",
    "Folder",
    "describe_error",
    "fold",
    "fold_forever",
]

#: Pending batches one fold applies at most (a backlog is worked off fold after fold).
FOLD_MAX_BATCHES: Final = 100
#: Seconds before a folder that lost its connection tries again.
RETRY_INTERVAL: Final = 5.0
#: A fold that takes longer is abandoned (a blackholed server) and retried.
FOLD_TIMEOUT: Final = 600.0

_BUCKET = "date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00')"

# Sums saturate at +/- the largest double instead of failing with "value out of range:
# overflow" (which would stop the fold for the whole fleet). Values below _HUGE in magnitude are
# summed as doubles, exactly as before (1.8e18 of them cannot overflow); the rare larger ones in
# numeric, brought back into range by ingest_saturate (migrations/0004_limits.sql).
_HUGE = "1e290"
# Two doubles below this in magnitude add without overflow.
_HALF_MAX = "8.98e307"


def _saturating_sum(column: str) -> str:
    small = f"sum({column}) FILTER (WHERE abs({column}) < {_HUGE})"
    huge = f"sum({column}::numeric) FILTER (WHERE abs({column}) >= {_HUGE})"
    return (
        f"CASE WHEN {huge} IS NULL THEN {small}"
        f" ELSE ingest_saturate(coalesce({small}, 0)::numeric + {huge}) END"
    )


def _saturating_add(a: str, b: str) -> str:
    return (
        f"CASE WHEN abs({a}) < {_HALF_MAX} AND abs({b}) < {_HALF_MAX} THEN {a} + {b}"
        f" ELSE ingest_saturate({a}::numeric + {b}::numeric) END"
    )


def _named_and_rolled_up(series: str) -> str:
    """The CTEs both fold statements share, given their ``by_series`` (per series and minute:
    n, sum, min, max): ``named`` (the device and metric of each series ``series`` selects,
    one probe of ``series`` each), ``agg``, and the upserts of the two rollup tables."""
    return f"""named AS MATERIALIZED (
    SELECT k.series_id, s.device_id, s.metric
    FROM ({series}) k
    CROSS JOIN LATERAL (
        SELECT device_id, metric FROM series WHERE id = k.series_id LIMIT 1
    ) s
), agg AS (
    SELECT n.device_id, n.metric, a.bucket, a.n, a.sum, a.min, a.max
    FROM by_series a JOIN named n USING (series_id)
), rollup AS (
    INSERT INTO readings_1m AS r (device_id, metric, bucket, n, sum, min, max)
    SELECT device_id, metric, bucket, n, sum, min, max FROM agg ORDER BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE
    SET n = r.n + excluded.n, sum = {_saturating_add("r.sum", "excluded.sum")},
        min = least(r.min, excluded.min), max = greatest(r.max, excluded.max)
), fleet AS (
    INSERT INTO readings_fleet_1m AS f (metric, bucket, n, sum, min, max)
    SELECT metric, bucket, sum(n), {_saturating_sum("sum")}, min(min), max(max)
    FROM agg GROUP BY 1, 2 ORDER BY 2, 1
    ON CONFLICT (bucket, metric) DO UPDATE
    SET n = f.n + excluded.n, sum = {_saturating_add("f.sum", "excluded.sum")},
        min = least(f.min, excluded.min), max = greatest(f.max, excluded.max)"""


def _apply_points_sql() -> str:
    """The statement that folds the claimed batches ($1: their numbers, $2: when each was
    stored; $3..$6: their batch and time ranges, which let the BRIN index on batch and
    partition pruning find their rows in ``points`` and ``text_points`` without a full scan).

    Everything is computed by series id, and names are looked up once per series, not per row:
    ``named`` probes the primary key of ``series`` for each series of the batches (a LATERAL
    subquery with LIMIT, so the planner cannot turn it into a join that reads all of
    ``series``). The rows are read once (``batch_points``), aggregated per series and minute
    (from which the fleet rollups and the newest time of each series come too), and read again
    to fetch the values at those newest times with a hash join on the key. (Sorting every row
    for a ``DISTINCT ON`` instead was over half of a fold's time.) Run it with ``enable_nestloop``
    off (:data:`PLANNER_SETTINGS`): the planner cannot estimate the batches' rows and would pick
    a nested loop, one pass over them per key. Every upsert reads its input grouped (no key
    twice in one statement) and sorted by key (lock ordering); buckets are UTC minutes whatever
    the session time zone. A device's first/last seen: when the first/last claimed batch
    holding it (numeric or text values) was stored."""
    where = "batch = ANY ($1::bigint[]) AND batch BETWEEN $3 AND $4 AND ts BETWEEN $5 AND $6"
    series = "SELECT series_id FROM by_series UNION SELECT series_id FROM batch_texts"
    return f"""
WITH batch_points AS (
    SELECT series_id, ts, value, batch FROM points WHERE {where}
), batch_texts AS (
    SELECT series_id, ts, value, batch FROM text_points WHERE {where}
), by_series AS (
    SELECT series_id, {_BUCKET} AS bucket,
           count(*)::integer AS n, {_saturating_sum("value")} AS sum,
           min(value) AS min, max(value) AS max, max(ts) AS last_ts
    FROM batch_points GROUP BY 1, 2
), {_named_and_rolled_up(series)}
), latest AS (
    INSERT INTO latest_readings AS l (device_id, metric, ts, value)
    SELECT n.device_id, n.metric, p.ts, p.value
    FROM (SELECT series_id, max(last_ts) AS ts FROM by_series GROUP BY 1) newest
    JOIN batch_points p ON p.series_id = newest.series_id AND p.ts = newest.ts
    JOIN named n ON n.series_id = newest.series_id
    -- (series_id, ts) is the key of points: one row per series
    ORDER BY n.device_id, n.metric
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value
    -- by device timestamp: a late or redelivered sample never replaces a newer one
    WHERE excluded.ts > l.ts
), latest_texts AS (
    INSERT INTO latest_text AS l (device_id, metric, ts, value)
    SELECT DISTINCT ON (n.device_id, n.metric) n.device_id, n.metric, t.ts, t.value
    FROM batch_texts t JOIN named n USING (series_id)
    ORDER BY n.device_id, n.metric, t.ts DESC
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value
    WHERE excluded.ts > l.ts
), seen AS (
    INSERT INTO devices AS d (device_id, first_seen, last_seen, last_ts)
    SELECT n.device_id, min(s.first_seen), max(s.last_seen), max(s.last_ts)
    FROM (
        SELECT x.series_id, min(p.stored_at) AS first_seen, max(p.stored_at) AS last_seen,
               max(x.ts) AS last_ts
        FROM (
            SELECT series_id, batch, ts FROM batch_points
            UNION ALL SELECT series_id, batch, ts FROM batch_texts
        ) x
        JOIN unnest($1::bigint[], $2::timestamptz[]) AS p (batch, stored_at) USING (batch)
        GROUP BY x.series_id
    ) s
    JOIN named n USING (series_id)
    GROUP BY n.device_id ORDER BY n.device_id
    ON CONFLICT (device_id) DO UPDATE
    SET last_seen = greatest(d.last_seen, excluded.last_seen),
        last_ts = greatest(d.last_ts, excluded.last_ts)
)
SELECT coalesce((SELECT sum(n) FROM by_series), 0) + (SELECT count(*) FROM batch_texts)
"""


def _apply_staged_sql() -> str:
    """The statement that folds claimed batches that staged their aggregates ($1: their
    numbers, $2: when each was stored) from their rows in ``dashboard_staged``, which it
    deletes: a row per series and minute of numeric readings (count, sum, min, max, and the
    newest reading of the minute) and a row per series of text readings (count and the newest),
    written with each batch (:func:`ingest.flow.writer.store`); their points are not read.
    Otherwise as :func:`_apply_points_sql`: by series id, names looked up once per series,
    upserts grouped and sorted by key."""
    return f"""
WITH staged AS MATERIALIZED (
    DELETE FROM dashboard_staged WHERE batch = ANY ($1::bigint[])
    RETURNING batch, series_id, bucket, n, sum, min, max, last_ts, last_value, last_text
), by_series AS (
    SELECT series_id, bucket, sum(n)::integer AS n, {_saturating_sum("sum")} AS sum,
           min(min) AS min, max(max) AS max
    FROM staged WHERE bucket IS NOT NULL GROUP BY 1, 2
), {_named_and_rolled_up("SELECT DISTINCT series_id FROM staged")}
), latest AS (
    INSERT INTO latest_readings AS l (device_id, metric, ts, value)
    SELECT DISTINCT ON (n.device_id, n.metric) n.device_id, n.metric, t.last_ts, t.last_value
    FROM staged t JOIN named n USING (series_id)
    WHERE t.bucket IS NOT NULL
    ORDER BY n.device_id, n.metric, t.last_ts DESC
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value
    -- by device timestamp: a late or redelivered sample never replaces a newer one
    WHERE excluded.ts > l.ts
), latest_texts AS (
    INSERT INTO latest_text AS l (device_id, metric, ts, value)
    SELECT DISTINCT ON (n.device_id, n.metric) n.device_id, n.metric, t.last_ts, t.last_text
    FROM staged t JOIN named n USING (series_id)
    WHERE t.bucket IS NULL
    ORDER BY n.device_id, n.metric, t.last_ts DESC
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value
    WHERE excluded.ts > l.ts
), seen AS (
    INSERT INTO devices AS d (device_id, first_seen, last_seen, last_ts)
    SELECT n.device_id, min(p.stored_at), max(p.stored_at), max(x.last_ts)
    FROM staged x
    JOIN unnest($1::bigint[], $2::timestamptz[]) AS p (batch, stored_at) USING (batch)
    JOIN named n USING (series_id)
    GROUP BY n.device_id ORDER BY n.device_id
    ON CONFLICT (device_id) DO UPDATE
    SET last_seen = greatest(d.last_seen, excluded.last_seen),
        last_ts = greatest(d.last_ts, excluded.last_ts)
)
SELECT coalesce((SELECT sum(n) FROM staged), 0)
"""


#: Run by the writer in a batch transaction before its rows: $1, $2 = the least and greatest
#: device timestamps of the batch; returns the batch number, which the writer sends in every
#: row it copies. ``set_config(..., true)`` (until commit) gives it to the column default of
#: ``batch`` too, for rows inserted otherwise in that transaction.
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
# The same for the given batches only (a fold that failed is retried in parts, to find the
# batches that cannot be folded).
_CLAIM_THESE_SQL = """
    WITH claim AS MATERIALIZED (
        SELECT batch FROM dashboard_pending WHERE batch = ANY ($1::bigint[])
        ORDER BY batch FOR UPDATE SKIP LOCKED
    )
    DELETE FROM dashboard_pending p USING claim c WHERE p.batch = c.batch
    RETURNING p.batch, p.stored_at, p.min_ts, p.max_ts
"""
# A batch that cannot be folded on its own leaves the queue for dashboard_failed.
_SET_ASIDE_SQL = """
    WITH gone AS (DELETE FROM dashboard_pending WHERE batch = $1 RETURNING *)
    INSERT INTO dashboard_failed (batch, stored_at, min_ts, max_ts, error)
    SELECT batch, stored_at, min_ts, max_ts, $2 FROM gone
    ON CONFLICT (batch) DO NOTHING
"""
# Counted up to a bound: the count runs after every fold, and a huge backlog must not make
# it expensive.
PENDING_COUNT_LIMIT: Final = 1_000_000
_PENDING_SQL = f"SELECT count(*) FROM (SELECT FROM dashboard_pending LIMIT {PENDING_COUNT_LIMIT}) p"
_APPLY_POINTS_SQL = _apply_points_sql()
_APPLY_STAGED_SQL = _apply_staged_sql()
# Which of the claimed batches handed over their aggregates (the others are read back).
_STAGED_SQL = "SELECT DISTINCT batch FROM dashboard_staged WHERE batch = ANY ($1::bigint[])"
#: For the fold's statement (:func:`_apply_sql`), scoped to its transaction.
PLANNER_SETTINGS: Final = "SET LOCAL enable_nestloop = off; SET LOCAL enable_mergejoin = off"
# Scoped to the fold's transaction: sorts of a fold's rows stay in memory, and the planner,
# which cannot know that the newest batch numbers are few, never scans a whole partition.
# JIT off: the nested loop that names the series is the only plan for its LATERAL subquery, so
# enable_nestloop = off adds its penalty to the plan's cost, which then passes jit_above_cost:
# compiling the statement took longer than running it (15 instead of 1.5 us per folded row).
_FOLD_SETTINGS = (
    "SET LOCAL work_mem = '64MB'; SET LOCAL enable_seqscan = off; SET LOCAL jit = off;"
    f" {PLANNER_SETTINGS}"
)


#: SQLSTATE classes of errors that come from the data being folded (a value out of range, a
#: constraint or a trigger rejecting a row): the fold is retried in parts, and only a batch
#: that fails on its own is set aside. Any other error (connection, permission, a missing
#: relation, a timeout) says nothing about the batches: the fold fails and is retried whole.
_DATA_ERROR_CLASSES: Final = frozenset({"22", "23", "P0"})


@dataclass(frozen=True, slots=True)
class FoldResult:
    """What one :func:`fold` applied: pending batches, and the readings rows they held; and the
    batches it set aside (``dashboard_failed``) with the error of the last of them."""

    batches: int = 0
    rows: int = 0
    set_aside: int = 0
    error: str | None = None

    def __add__(self, other: FoldResult) -> FoldResult:
        return FoldResult(
            self.batches + other.batches,
            self.rows + other.rows,
            self.set_aside + other.set_aside,
            other.error or self.error,
        )


async def fold(
    conn: asyncpg.Connection[asyncpg.Record], *, max_batches: int = FOLD_MAX_BATCHES
) -> FoldResult:
    """Apply up to ``max_batches`` committed pending batches to the dashboard tables, in one
    transaction (see the module docstring). Safe to run from several connections at once.

    When the data makes it fail (:data:`_DATA_ERROR_CLASSES`), the claimed batches are folded
    again in halves, down to single batches: a batch that fails on its own moves to
    ``dashboard_failed`` with its error, every other one is folded. Other errors propagate and
    leave every batch pending."""
    claimed: list[int] = []
    try:
        return await _fold_claimed(conn, _CLAIM_SQL, max_batches, claimed)
    except asyncpg.PostgresError as exc:
        if not _is_data_error(exc) or not claimed:
            raise
        return await _bisect(conn, claimed, exc)


async def _fold_claimed(
    conn: asyncpg.Connection[asyncpg.Record], claim_sql: str, arg: object, claimed: list[int]
) -> FoldResult:
    """Claim with ``claim_sql`` (its ids go to ``claimed``, even when the fold then fails) and
    apply the batches, in one transaction."""
    async with conn.transaction():
        rows = await conn.fetch(claim_sql, arg)
        if not rows:
            return FoldResult()
        batches = [r["batch"] for r in rows]
        claimed.extend(batches)
        await conn.execute(_FOLD_SETTINGS)
        staged = {r["batch"] for r in await conn.fetch(_STAGED_SQL, batches)}
        # Two statements, each made for its kind of batch, in one transaction: a key both
        # touch is upserted by the first, then updated by the second.
        count = 0
        points = [r for r in rows if r["batch"] not in staged]
        if points:
            count += await conn.fetchval(
                _APPLY_POINTS_SQL,
                [r["batch"] for r in points],
                [r["stored_at"] for r in points],
                min(r["batch"] for r in points),
                max(r["batch"] for r in points),
                min(r["min_ts"] for r in points),
                max(r["max_ts"] for r in points),
            )
        if staged:
            count += await conn.fetchval(
                _APPLY_STAGED_SQL,
                [r["batch"] for r in rows if r["batch"] in staged],
                [r["stored_at"] for r in rows if r["batch"] in staged],
            )
    return FoldResult(batches=len(batches), rows=int(count))


async def _bisect(
    conn: asyncpg.Connection[asyncpg.Record], batches: list[int], exc: asyncpg.PostgresError
) -> FoldResult:
    """``batches`` failed together with the data error ``exc``: fold each half on its own,
    and set aside a single batch that still fails."""
    if len(batches) == 1:
        error = describe_error(exc)
        await conn.execute(_SET_ASIDE_SQL, batches[0], error)
        return FoldResult(set_aside=1, error=error)
    total = FoldResult()
    middle = len(batches) // 2
    for part in (batches[:middle], batches[middle:]):
        try:
            total += await _fold_claimed(conn, _CLAIM_THESE_SQL, part, [])
        except asyncpg.PostgresError as part_exc:
            if not _is_data_error(part_exc):
                raise
            total += await _bisect(conn, part, part_exc)
    return total


def _is_data_error(exc: asyncpg.PostgresError) -> bool:
    return str(getattr(exc, "sqlstate", ""))[:2] in _DATA_ERROR_CLASSES


def describe_error(exc: BaseException) -> str:
    """One line naming an error: its type, message and, for a database error, SQLSTATE."""
    sqlstate = getattr(exc, "sqlstate", None)
    where = f" (SQLSTATE {sqlstate})" if sqlstate else ""
    return f"{type(exc).__name__}: {exc}{where}"


class _Throttle:
    """Lets one log line through per ``interval`` seconds and counts the others."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: float | None = None
        self._held = 0

    def allow(self) -> int | None:
        """None: stay quiet; else how many were held back since the last line."""
        now = time.monotonic()
        if self._last is not None and now - self._last < self._interval:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held


class Folder:
    """Folds pending batches every ``settings.dashboard_interval`` seconds (at once again while
    a backlog remains), forever: the daemon runs :meth:`run` as a task and cancels it at
    shutdown; whatever is still pending then is folded by the next run (or another instance).

    A failed fold (the database away, a permission, a timeout) is counted, logged each time
    (at most one line per :data:`RETRY_INTERVAL`, saying how many were held back) and retried;
    never fatal. Batches set aside by :func:`fold` are counted and logged the same way.
    :meth:`statistics` shows it all (metrics, ``/readyz``)."""

    def __init__(
        self,
        dsn: str | None,
        settings: Settings,
        log: logging.Logger,
        *,
        max_batches: int = FOLD_MAX_BATCHES,
        retry_interval: float = RETRY_INTERVAL,
    ) -> None:
        self._dsn = dsn
        self._settings = settings
        self._log = log
        self._max_batches = max_batches
        self._retry_interval = retry_interval
        self._failure_log = _Throttle(retry_interval)
        self._set_aside_log = _Throttle(retry_interval)
        self._folds = 0
        self._failures = 0
        self._in_a_row = 0
        self._failing_since: float | None = None
        self._set_aside = 0
        self._pending = 0
        self._last_error: str | None = None

    def statistics(self) -> DashboardStatistics:
        return DashboardStatistics(
            folds=self._folds,
            fold_failures=self._failures,
            failing_since=self._failing_since,
            set_aside=self._set_aside,
            pending_batches=self._pending,
            last_error=self._last_error,
        )

    async def run(self) -> None:
        while True:
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self._settings.db_connect_timeout,
                    server_settings={"application_name": "iot-ingest dashboard"},
                )
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                self._failed(exc)
            else:
                try:
                    await self._fold_on(conn)
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                ) as exc:
                    self._failed(exc)
                finally:
                    # Cancelled or failed: never wait on a server that may not answer.
                    conn.terminate()
            await anyio.sleep(self._retry_interval)

    async def _fold_on(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        while True:
            with anyio.fail_after(FOLD_TIMEOUT):
                result = await fold(conn, max_batches=self._max_batches)
                pending = await conn.fetchval(_PENDING_SQL)
            self._succeeded(result, int(pending))
            if result.batches + result.set_aside < self._max_batches:
                await anyio.sleep(self._settings.dashboard_interval)

    def _succeeded(self, result: FoldResult, pending: int) -> None:
        self._folds += 1
        self._pending = pending
        if self._in_a_row:
            self._log.info("dashboard fold works again after %d failures", self._in_a_row)
        self._in_a_row = 0
        self._failing_since = None
        if result.set_aside:
            self._set_aside += result.set_aside
            if (held := self._set_aside_log.allow()) is not None:
                self._log.error(
                    "dashboard fold set aside %d batch(es) it cannot fold, %d in all"
                    " (table dashboard_failed; their readings are stored)%s: %s",
                    result.set_aside,
                    self._set_aside,
                    _held(held),
                    result.error,
                )

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        self._in_a_row += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._last_error = describe_error(exc)
        if (held := self._failure_log.allow()) is not None:
            self._log.warning(
                "dashboard fold failed (%d in a row%s), retrying in %gs: %s",
                self._in_a_row,
                _held(held),
                self._retry_interval,
                self._last_error,
            )


def _held(count: int) -> str:
    return f", {count} more not logged" if count else ""


async def fold_forever(dsn: str | None, settings: Settings, log: logging.Logger) -> None:
    """:meth:`Folder.run` of a new :class:`Folder` (whose statistics nobody reads)."""
    await Folder(dsn, settings, log).run()
