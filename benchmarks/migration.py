"""How long the in-place migration to series ids (migrations/0006_series.sql) takes on a
database filled by the earlier schema.

    python -m benchmarks.migration --rows 10000000 [--database-url postgresql://...] [--pg-tuned]

Makes a database with migrations 0001-0005 only (``readings`` a table keyed by
``(device_id, metric, ts)``, daily partitions), loads ``--rows`` readings over the last
``--days`` days and the dashboard tables from them, then times ``ingest migrate`` (the rest of
the migrations and the grants) and checks that every row is there. Against a throwaway durable
cluster unless ``--database-url`` names a server (a database is created there and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.dashboard import _server, _with_db
from ingest.db.migrate import apply_migrations, load_migrations

_FIRST_V2 = "0006"

# Samples [$1, $2) of every (device, metric): sample s of device d at start + (s + d/devices) *
# step, values as a sensor's.
_LOAD_SQL = """
    INSERT INTO readings (device_id, metric, ts, value)
    SELECT 'dev-' || lpad(d::text, 5, '0'), 'm' || m,
           $3::timestamptz + make_interval(secs => (s + d::float8 / $5::int) * $4::float8),
           round((50 + 20 * sin(s / 50.0 + d) + m)::numeric, 2)::float8
    FROM generate_series($1::int, $2::int - 1) s,
         generate_series(1, $5::int) d,
         generate_series(0, $6::int - 1) m
"""
_DASHBOARD_SQL = """
    INSERT INTO latest_readings
    SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value FROM readings
    ORDER BY device_id, metric, ts DESC;
    INSERT INTO devices SELECT device_id, min(ts), max(ts), max(ts) FROM readings GROUP BY 1;
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.migration", description=__doc__)
    p.add_argument("--rows", type=int, default=10_000_000, help="readings to load (10000000)")
    p.add_argument("--devices", type=int, default=1000, help="devices (1000)")
    p.add_argument("--metrics", type=int, default=5, help="metrics per device (5)")
    p.add_argument("--days", type=int, default=3, help="days the readings span, up to now (3)")
    p.add_argument("--database-url", default=None, help="admin DSN of an existing server")
    p.add_argument(
        "--pg-tuned",
        action="store_true",
        help="the throwaway cluster with README's ingest settings",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return p


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _v1(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The earlier schema: the migrations before series ids, as ``ingest migrate`` applied them."""
    await conn.execute(
        "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for m in load_migrations():
        if m.version >= _FIRST_V2:
            break
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", m.version)


async def _load(conn: asyncpg.Connection[asyncpg.Record], a: argparse.Namespace) -> float:
    end = datetime.now(UTC)
    first = datetime(end.year, end.month, end.day, tzinfo=UTC) - timedelta(days=a.days)
    for day in range(a.days + 2):
        await conn.execute("SELECT ingest_create_partition('readings', $1)", first + timedelta(day))
    keys = a.devices * a.metrics
    per_key = max(1, a.rows // keys)
    step = a.days * 86400.0 / per_key
    start = end - timedelta(days=a.days)
    t0 = time.perf_counter()
    chunk = max(1, 500_000 // keys)
    for lo in range(0, per_key, chunk):
        hi = min(per_key, lo + chunk)
        await conn.execute(_LOAD_SQL, lo, hi, start, step, a.devices, a.metrics)
        _log(f"  loaded {hi * keys:,} readings")
    await conn.execute(_DASHBOARD_SQL)
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - t0


async def _run(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    name = f"bench_migration_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    conn = await asyncpg.connect(_with_db(admin, name))
    try:
        await _v1(conn)
        _log(f"loading {a.rows:,} readings into the earlier schema ...")
        load_s = await _load(conn, a)
        before = await conn.fetchval("SELECT count(*) FROM readings")
        size = await conn.fetchval(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(relid)))"
            " FROM pg_partition_tree('readings')"
        )
        _log("migrating ...")
        t0 = time.perf_counter()
        applied = await apply_migrations(conn)
        migrate_s = time.perf_counter() - t0
        after = await conn.fetchval("SELECT count(*) FROM readings")
        size_after = await conn.fetchval(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(relid)))"
            " FROM pg_partition_tree('points')"
        )
    finally:
        await conn.close()
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
    return {
        "rows": before,
        "rows_after": after,
        "applied": applied,
        "load_seconds": round(load_s, 1),
        "migrate_seconds": round(migrate_s, 1),
        "rows_per_second": round(before / migrate_s),
        "readings_size_before": size,
        "points_size_after": size_after,
    }


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    with _server(a.database_url, tuned=a.pg_tuned) as admin:
        result = asyncio.run(_run(admin, a))
    print(json.dumps(result, indent=2))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2))
    return 0 if result["rows"] == result["rows_after"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
