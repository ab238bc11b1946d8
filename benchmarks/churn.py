"""Series churn: what devices appearing for the first time cost the writer.

    python -m benchmarks.churn [--devices 100000] [--metrics 5] [--pg-tuned]

Writes, through the daemon's :class:`~ingest.flow.writer.Writer` (the MQTT side is not
involved), one message of ``--metrics`` readings from each of ``--devices`` devices that the
database has never seen, in batches of ``--batch-messages`` messages: every reading needs a
new series, created in bulk before its batch. Then the same devices once more, a second later:
their series are in the writer's cache. Then once more with a new writer (cold cache, series in
the database). The figures: rows/s of each pass, series created per second in the first, and
PostgreSQL's CPU per row (its backends' CPU time, from /proc).
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

from benchmarks.dashboard import _backend_cpu, _pids, _server, _with_db
from ingest.db.migrate import migrate_dsn
from ingest.db.partitions import ensure_partitions
from ingest.flow.writer import Writer
from ingest.model import Decoded, Envelope, Reading


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.churn", description=__doc__)
    p.add_argument("--devices", type=int, default=100_000, help="new devices (100000)")
    p.add_argument("--metrics", type=int, default=5, help="metrics per device (5)")
    p.add_argument("--batch-messages", type=int, default=1000, help="messages per batch (1000)")
    p.add_argument("--database-url", default=None, help="admin DSN of an existing server")
    p.add_argument(
        "--pg-tuned",
        action="store_true",
        help="the throwaway cluster with README's ingest settings",
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return p


def _batches(a: argparse.Namespace, ts: datetime) -> list[list[Envelope]]:
    metrics = [f"m{m}" for m in range(a.metrics)]
    out: list[list[Envelope]] = []
    for lo in range(0, a.devices, a.batch_messages):
        batch = []
        for d in range(lo, min(a.devices, lo + a.batch_messages)):
            device = f"churn-{d:07d}"
            rows = [Reading(device, m, ts, float(d)) for m in metrics]
            batch.append(Envelope(f"devices/{device}/telemetry", b"", ts, Decoded(rows, 0)))
        out.append(batch)
    return out


async def _pass(
    dsn: str, writer: Writer, batches: list[list[Envelope]], app: str
) -> dict[str, Any]:
    pids = await _pids(dsn, app)
    cpu0 = _backend_cpu(pids)
    created0 = writer.statistics().series_created
    t0 = time.perf_counter()
    rows = 0
    for batch in batches:
        rows += (await writer.write(batch)).inserted
    seconds = time.perf_counter() - t0
    cpu1 = _backend_cpu(pids)
    created = writer.statistics().series_created - created0
    pg_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "series_created": created,
        "series_per_s": round(created / seconds) if created else 0,
        "postgres_cpu_us_per_row": round(pg_cpu / rows * 1e6, 2) if pg_cpu and rows else None,
    }


async def _run(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    name = f"bench_churn_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    dsn = _with_db(admin, name)
    try:
        await migrate_dsn(dsn)
        now = datetime.now(UTC)
        conn = await asyncpg.connect(dsn)
        await ensure_partitions(conn, days_ahead=1, now=now)
        await conn.close()
        results: dict[str, Any] = {}
        app = "bench-churn"
        async with Writer(dsn=dsn, application_name=app, pool_size=1) as writer:
            await writer.ping()
            results["new_devices"] = await _pass(dsn, writer, _batches(a, now), app)
            later = now + timedelta(seconds=1)
            results["known_cached"] = await _pass(dsn, writer, _batches(a, later), app)
        async with Writer(dsn=dsn, application_name=app, pool_size=1) as cold:
            await cold.ping()
            again = now + timedelta(seconds=2)
            results["known_cold_cache"] = await _pass(dsn, cold, _batches(a, again), app)
        return results
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    with _server(a.database_url, tuned=a.pg_tuned) as admin:
        result = asyncio.run(_run(admin, a))
    print(json.dumps(result, indent=2), file=sys.stdout)
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
