"""Dashboard benchmark: panel query latency on a loaded database, and what maintaining the
dashboard tables costs the write path.

``python -m benchmarks.dashboard [--rows N] [--devices D] [--metrics M] [--days X] [--runs R]``

1. **load**: ``--rows`` readings (default 10,000,000: 1,000 devices x 5 metrics over 3 days,
   ending now) generated in SQL straight into ``readings``, one time slice per statement,
   with ``readings_1m``, ``latest_readings`` and ``devices`` computed in SQL from the very
   rows each statement inserted (the daemon's path is measured separately, below). Then
   ``VACUUM ANALYZE``, as autovacuum would have done by then.
2. **queries**: the usual panels, each ``--runs`` times (a random device each time, planning
   included: no prepared statements, like Grafana's literal SQL); p50, p95, max.
3. **write path**: the daemon's :class:`~ingest.flow.writer.Writer` storing batches of
   ``--batch-rows`` rows, two in flight (the batch is only recorded for the dashboard tables,
   :func:`ingest.db.dashboard.fold` applies it), ``--write-rounds`` runs of ``--write-batches``
   batches each; rows/s (medians) and the server's CPU per row. After each run, the fold of
   what it wrote, ``--fold-batches`` batches per fold. Two batch shapes: one sample per
   (device, metric) per batch (each reading its own rollup key, the worst case) and ten
   (messages carrying ten samples).

By default everything runs on a throwaway cluster
(``ingest.devservers.throwaway.PostgresCluster``, set to ``fsync`` on, 256 MB shared buffers)
so the system server is not filled;
``--database-url`` uses an existing server instead (a fresh database, dropped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks._env import PG_TUNED
from ingest.db.dashboard import fold
from ingest.db.migrate import migrate_dsn
from ingest.db.partitions import ensure_partitions
from ingest.devservers.throwaway import PostgresCluster
from ingest.flow.writer import Writer
from ingest.model import Decoded, Envelope, Reading

__all__ = ["main"]

_CLUSTER_SETTINGS = {
    "fsync": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
}

# One time slice of the load: samples [$1, $2) of every (device, metric), sample s of device
# d at start + (s + d/devices) * step, so every device reports every `step` seconds, spread.
_LOAD_SQL = """
WITH stored AS (
    INSERT INTO points (series_id, ts, value)
    SELECT k.id,
           $3::timestamptz + make_interval(secs => (s + d::float8 / $5::int) * $4::float8),
           round((50 + 20 * sin(s / 50.0 + d) + m)::numeric, 2)::float8
    FROM generate_series($1::int, $2::int - 1) s,
         generate_series(1, $5::int) d,
         generate_series(0, $6::int - 1) m,
         LATERAL (SELECT id FROM series
                  WHERE device_id = 'dev-' || lpad(d::text, 5, '0') AND metric = 'm' || m) k
    RETURNING series_id, ts, value
), ins AS (
    SELECT k.device_id, k.metric, stored.ts, stored.value
    FROM stored JOIN series k ON k.id = stored.series_id
), rollup AS (
    INSERT INTO readings_1m AS r (device_id, metric, bucket, n, sum, min, max)
    SELECT device_id, metric, date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00'),
           count(*)::integer, sum(value), min(value), max(value)
    FROM ins GROUP BY 1, 2, 3 ORDER BY 3, 1, 2
    ON CONFLICT (device_id, metric, bucket) DO UPDATE
    SET n = r.n + excluded.n, sum = r.sum + excluded.sum,
        min = least(r.min, excluded.min), max = greatest(r.max, excluded.max)
), fleet AS (
    INSERT INTO readings_fleet_1m AS f (metric, bucket, n, sum, min, max)
    SELECT metric, date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00'),
           count(*), sum(value), min(value), max(value)
    FROM ins GROUP BY 1, 2 ORDER BY 2, 1
    ON CONFLICT (bucket, metric) DO UPDATE
    SET n = f.n + excluded.n, sum = f.sum + excluded.sum,
        min = least(f.min, excluded.min), max = greatest(f.max, excluded.max)
), latest AS (
    INSERT INTO latest_readings AS l (device_id, metric, ts, value)
    SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value
    FROM ins ORDER BY device_id, metric, ts DESC
    ON CONFLICT (device_id, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value
    WHERE excluded.ts > l.ts
)
INSERT INTO devices AS dv (device_id, first_seen, last_seen, last_ts)
SELECT device_id, min(ts), max(ts), max(ts) FROM ins GROUP BY device_id
ON CONFLICT (device_id) DO UPDATE
SET last_seen = greatest(dv.last_seen, excluded.last_seen),
    last_ts = greatest(dv.last_ts, excluded.last_ts)
"""


# Every series of the load, in key order (as the daemon's writer would create them).
_SERIES_SQL = """
INSERT INTO series (device_id, metric)
SELECT 'dev-' || lpad(d::text, 5, '0'), 'm' || m
FROM generate_series(1, $1::int) d, generate_series(0, $2::int - 1) m
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class Panel:
    name: str
    sql: str
    args: Callable[[random.Random], tuple[Any, ...]]


def _panels(devices: int, metrics: int) -> list[Panel]:
    def device(rng: random.Random) -> str:
        return f"dev-{rng.randint(1, devices):05d}"

    return [
        Panel(
            "latest values of one device",
            "SELECT metric, ts, value, age FROM current_values WHERE device_id = $1 ORDER BY metric",
            lambda rng: (device(rng),),
        ),
        Panel(
            "24 h of 1-minute buckets, one device and metric",
            "SELECT bucket, sum / n AS avg, min, max, n FROM readings_1m"
            " WHERE device_id = $1 AND metric = $2"
            " AND bucket >= now() - interval '24 hours' ORDER BY bucket",
            lambda rng: (device(rng), f"m{rng.randrange(metrics)}"),
        ),
        Panel(
            "fleet summary, last hour (per metric)",
            "SELECT metric, devices, readings, avg, min, max FROM fleet_summary_1h ORDER BY metric",
            lambda rng: (),
        ),
        Panel(
            "devices seen in the last 5 minutes",
            "SELECT count(*) FROM devices WHERE last_seen > now() - interval '5 minutes'",
            lambda rng: (),
        ),
        Panel(
            "fleet status (one row)",
            "SELECT * FROM fleet_status",
            lambda rng: (),
        ),
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.dashboard",
        description="Load readings, time the dashboard panel queries, and measure what the "
        "dashboard maintenance costs the writer.",
    )
    p.add_argument("--rows", type=int, default=10_000_000, help="readings to load (10000000)")
    p.add_argument("--devices", type=int, default=1000, help="devices (1000)")
    p.add_argument("--metrics", type=int, default=5, help="metrics per device (5)")
    p.add_argument("--days", type=float, default=3.0, help="days the readings span, up to now (3)")
    p.add_argument("--runs", type=int, default=50, help="runs of each panel query (50)")
    p.add_argument("--write-batches", type=int, default=30, help="batches per write run (30)")
    p.add_argument("--write-rounds", type=int, default=3, help="write runs per batch shape (3)")
    p.add_argument("--batch-rows", type=int, default=5000, help="rows per batch (5000)")
    p.add_argument("--fold-batches", type=int, default=10, help="batches per dashboard fold (10)")
    p.add_argument("--skip-write", action="store_true", help="only load and time the queries")
    p.add_argument(
        "--database-url",
        default=None,
        help="an existing server (admin DSN) instead of a throwaway cluster",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="with --database-url: keep the loaded database (its DSN goes to stderr)",
    )
    p.add_argument(
        "--pg-tuned",
        action="store_true",
        help="the throwaway cluster with README's PostgreSQL settings for ingest",
    )
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    p.add_argument("--seed", type=int, default=1)
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _with_db(dsn: str, db: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@contextlib.contextmanager
def _server(database_url: str | None, *, tuned: bool = False) -> Iterator[str]:
    """Admin DSN of the server to use: a throwaway cluster unless one is given (``tuned``:
    with README's PostgreSQL settings for ingest)."""
    if database_url is not None:
        yield database_url
        return
    with PostgresCluster() as cluster:
        for key, value in (_CLUSTER_SETTINGS | (PG_TUNED if tuned else {})).items():
            asyncio.run(_execute(cluster.dsn(), f"ALTER SYSTEM SET {key} = '{value}'"))
        cluster.restart()
        yield cluster.dsn()


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# -- load ---------------------------------------------------------------------------------------


async def load(dsn: str, a: argparse.Namespace, end: datetime) -> dict[str, Any]:
    keys = a.devices * a.metrics
    per_key = max(1, a.rows // keys)
    span = a.days * 86400.0
    step = span / per_key
    start = end - timedelta(seconds=span)
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_partitions(conn, days_ahead=int(a.days) + 2, now=start)
        await ensure_partitions(conn, days_ahead=3, now=end)
        await conn.execute(_SERIES_SQL, a.devices, a.metrics)
        slice_samples = max(1, 250_000 // keys)
        t0 = time.perf_counter()
        done = 0
        for lo in range(0, per_key, slice_samples):
            hi = min(per_key, lo + slice_samples)
            await conn.execute(_LOAD_SQL, lo, hi, start, step, a.devices, a.metrics)
            done += (hi - lo) * keys
            elapsed = time.perf_counter() - t0
            _log(f"  loaded {done:,} readings ({done / elapsed:,.0f}/s)")
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        vacuum_s = time.perf_counter() - t1
        sizes = {
            r["name"]: r["size"]
            for r in await conn.fetch(
                "SELECT t AS name, pg_size_pretty(sum(pg_total_relation_size(p.relid))) AS size"
                " FROM unnest(ARRAY['points', 'readings_1m']) t,"
                " LATERAL pg_partition_tree(t::regclass) p GROUP BY t"
                " UNION ALL SELECT t, pg_size_pretty(pg_total_relation_size(t::regclass))"
                " FROM unnest(ARRAY['latest_readings', 'devices']) t"
            )
        }
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM readings) AS readings,"
            " (SELECT count(*) FROM readings_1m) AS rollups,"
            " (SELECT count(*) FROM latest_readings) AS latest,"
            " (SELECT count(*) FROM devices) AS devices"
        )
    finally:
        await conn.close()
    assert counts is not None
    return {
        "readings": counts["readings"],
        "rollup_rows": counts["rollups"],
        "latest_rows": counts["latest"],
        "devices": counts["devices"],
        "sample_interval_s": round(step, 1),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "load_seconds": round(load_s, 1),
        "vacuum_analyze_seconds": round(vacuum_s, 1),
        "sizes": sizes,
    }


# -- queries ------------------------------------------------------------------------------------


async def time_queries(dsn: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(a.seed)
    # No statement cache: every run is parsed and planned, like Grafana's literal SQL.
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    out = []
    try:
        for panel in _panels(a.devices, a.metrics):
            rows = await conn.fetch(panel.sql, *panel.args(rng))  # warm-up, and a sanity check
            times = []
            for _ in range(a.runs):
                args = panel.args(rng)
                t = time.perf_counter()
                await conn.fetch(panel.sql, *args)
                times.append((time.perf_counter() - t) * 1000)
            times.sort()
            out.append(
                {
                    "panel": panel.name,
                    "sql": panel.sql,
                    "rows": len(rows),
                    "p50_ms": round(statistics.median(times), 2),
                    "p95_ms": round(times[max(0, round(0.95 * len(times)) - 1)], 2),
                    "max_ms": round(times[-1], 2),
                }
            )
            _log(f"  {panel.name}: p50 {out[-1]['p50_ms']} ms, p95 {out[-1]['p95_ms']} ms")
    finally:
        await conn.close()
    return out


# -- write path ---------------------------------------------------------------------------------


def _batches(
    a: argparse.Namespace, start: datetime, samples_per_key: int, count: int
) -> list[list[Envelope]]:
    """``count`` batches of about ``--batch-rows`` rows: messages of ``samples_per_key``
    samples x ``--metrics`` readings, devices in turn, timestamps after ``start``."""
    per_message = samples_per_key * a.metrics
    messages = max(1, a.batch_rows // per_message)
    received = datetime.now(UTC)
    batches: list[list[Envelope]] = []
    device = 0
    tick = 0
    for _ in range(count):
        batch = []
        for _ in range(messages):
            if device == a.devices:
                device, tick = 0, tick + samples_per_key
            name = f"dev-{device + 1:05d}"
            rows = [
                Reading(
                    name, f"m{m}", start + timedelta(milliseconds=10 * (tick + s)), float(s + m)
                )
                for s in range(samples_per_key)
                for m in range(a.metrics)
            ]
            batch.append(Envelope(f"devices/{name}/telemetry", b"", received, Decoded(rows, 0)))
            device += 1
        batches.append(batch)
    return batches


def _rows(envelope: Envelope) -> int:
    return len(envelope.result.readings) if isinstance(envelope.result, Decoded) else 0


def _backend_cpu(pids: list[int]) -> float | None:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _pids(dsn: str, application_name: str) -> list[int]:
    probe = await asyncpg.connect(dsn)
    try:
        rows = await probe.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
        )
    finally:
        await probe.close()
    return [r["pid"] for r in rows]


async def _write_run(dsn: str, batches: list[list[Envelope]]) -> dict[str, float]:
    app = f"bench-{uuid.uuid4().hex[:8]}"
    async with Writer(dsn=dsn, application_name=app) as writer:
        # Warm the pool (both connections: the daemon pipelines two batches) and the caches.
        await asyncio.gather(writer.ping(), writer.ping())
        pids = await _pids(dsn, app)
        rows = sum(_rows(e) for b in batches for e in b)
        cpu0, client0 = _backend_cpu(pids), time.process_time()
        t = time.perf_counter()
        # Two batches in flight, as the daemon's pool of two does.
        queue = list(reversed(batches))

        async def worker() -> None:
            while queue:
                await writer.write(queue.pop())

        await asyncio.gather(worker(), worker())
        wall = time.perf_counter() - t
        cpu1, client1 = _backend_cpu(pids), time.process_time()
        inserted = writer.statistics().rows_inserted
    if inserted != rows:
        raise RuntimeError(f"expected {rows} new rows, {inserted} inserted")
    out = {"rows_per_s": rows / wall, "client_cpu_us_per_row": (client1 - client0) / rows * 1e6}
    if cpu0 is not None and cpu1 is not None:
        out["server_cpu_us_per_row"] = (cpu1 - cpu0) / rows * 1e6
    return out


async def _fold_run(dsn: str, fold_batches: int) -> dict[str, float]:
    """Fold everything pending, ``fold_batches`` batches per fold (what one fold of the
    daemon's folder takes in when that many batches were written within its interval)."""
    app = f"bench-fold-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn, server_settings={"application_name": app})
    try:
        pid = conn.get_server_pid()
        cpu0, t = _backend_cpu([pid]), time.perf_counter()
        rows = folds = 0
        while (result := await fold(conn, max_batches=fold_batches)).batches:
            rows += result.rows
            folds += 1
        wall = time.perf_counter() - t
        cpu1 = _backend_cpu([pid])
    finally:
        await conn.close()
    out = {
        "rows_per_s": rows / wall,
        "ms_per_fold": wall / max(folds, 1) * 1000,
        "folds": folds,
        "rows": rows,
    }
    if cpu0 is not None and cpu1 is not None:
        out["server_cpu_us_per_row"] = (cpu1 - cpu0) / max(rows, 1) * 1e6
    return out


async def write_path(dsn: str, a: argparse.Namespace, after: datetime) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for samples_per_key in (1, 10):
        runs: dict[str, list[dict[str, float]]] = {"write": [], "fold": []}
        for r in range(a.write_rounds):
            offset = timedelta(hours=1 + len(results) * 24 + r * 3)
            batches = _batches(a, after + offset, samples_per_key, a.write_batches)
            runs["write"].append(await _write_run(dsn, batches))
            runs["fold"].append(await _fold_run(dsn, a.fold_batches))
            w, f = runs["write"][-1], runs["fold"][-1]
            _log(
                f"  {samples_per_key} sample(s)/key/batch: {w['rows_per_s']:,.0f} rows/s;"
                f" fold: {f['rows']:,.0f} rows in {f['folds']:.0f} folds,"
                f" {f['ms_per_fold']:.0f} ms each, {f['rows_per_s']:,.0f} rows/s"
            )

        def med(
            what: str, key: str, runs: dict[str, list[dict[str, float]]] = runs
        ) -> float | None:
            values = [run[key] for run in runs[what] if key in run]
            return round(statistics.median(values), 2) if values else None

        results.append(
            {
                "samples_per_key_per_batch": samples_per_key,
                "write": {
                    "rows_per_s": round(med("write", "rows_per_s") or 0),
                    "server_cpu_us_per_row": med("write", "server_cpu_us_per_row"),
                    "client_cpu_us_per_row": med("write", "client_cpu_us_per_row"),
                    "runs": [round(run["rows_per_s"]) for run in runs["write"]],
                },
                "fold": {
                    "batches_per_fold": a.fold_batches,
                    "rows_per_s": round(med("fold", "rows_per_s") or 0),
                    "ms_per_fold": med("fold", "ms_per_fold"),
                    "server_cpu_us_per_row": med("fold", "server_cpu_us_per_row"),
                },
            }
        )
    return results


# -- report -------------------------------------------------------------------------------------


def _report(result: dict[str, Any]) -> str:
    ld = result["load"]
    lines = [
        f"load: {ld['readings']:,} readings ({ld['devices']:,} devices, one sample every "
        f"{ld['sample_interval_s']} s per device and metric), {ld['rollup_rows']:,} rollup rows;"
        f" {ld['load_seconds']} s + VACUUM ANALYZE {ld['vacuum_analyze_seconds']} s; sizes "
        + ", ".join(f"{k} {v}" for k, v in ld["sizes"].items()),
        "",
        f"| panel query ({result['runs']} runs, planning included) | rows | p50 ms | p95 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {q['panel']} | {q['rows']} | {q['p50_ms']} | {q['p95_ms']} | {q['max_ms']} |"
        for q in result["queries"]
    ]
    if result.get("write_path"):
        lines += [
            "",
            "| write path: Writer, 2 batches in flight | rows/s "
            "| server CPU us/row: writer + its fold |",
            "| --- | ---: | ---: |",
        ]
        for w in result["write_path"]:
            wr, fo = w["write"], w["fold"]
            lines.append(
                f"| {w['samples_per_key_per_batch']} sample(s) per device and metric per batch "
                f"| {wr['rows_per_s']:,} "
                f"| {wr['server_cpu_us_per_row']} + {fo['server_cpu_us_per_row']} |"
            )
        fold_batches = result["write_path"][0]["fold"]["batches_per_fold"]
        lines.append(
            f"\nfold: {fold_batches} batches per fold (a second's worth at "
            f"{fold_batches * result['batch_rows']:,} rows/s with INGEST_DASHBOARD_INTERVAL=1): "
            + "; ".join(
                f"{w['samples_per_key_per_batch']} sample(s)/key/batch "
                f"{w['fold']['rows_per_s']:,} rows/s, {w['fold']['ms_per_fold']} ms per fold"
                for w in result["write_path"]
            )
        )
    return "\n".join(lines)


async def _run(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    name = f"bench_dashboard_{uuid.uuid4().hex[:8]}"
    await _execute(admin, f'CREATE DATABASE "{name}"')
    dsn = _with_db(admin, name)
    try:
        await migrate_dsn(dsn)
        end = datetime.now(UTC)
        _log(f"loading {a.rows:,} readings into {name} ...")
        loaded = await load(dsn, a, end)
        _log("timing panel queries ...")
        queries = await time_queries(dsn, a)
        writes = []
        if not a.skip_write:
            _log("measuring the write path ...")
            writes = await write_path(dsn, a, datetime.now(UTC))
        return {
            "load": loaded,
            "runs": a.runs,
            "batch_rows": a.batch_rows,
            "queries": queries,
            "write_path": writes,
        }
    finally:
        if a.keep and a.database_url is not None:
            _log(f"kept: {dsn}")
        else:
            await _execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    with _server(a.database_url, tuned=a.pg_tuned) as admin:
        result = asyncio.run(_run(admin, a))
    print(_report(result))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
