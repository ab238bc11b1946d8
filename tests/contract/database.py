"""Database helpers of the contract tests that run against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg

from ingest.db.migrate import migrate_dsn
from ingest.flow.writer import Writer


async def migrated_writer(database_url: str, *, pool_size: int = 1) -> Writer:
    """A writer (not yet entered) on a freshly migrated database."""
    await migrate_dsn(database_url)
    return Writer(dsn=database_url, pool_size=pool_size, backoff_max=0.5)


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetchval(database_url: str, sql: str, *args: Any) -> Any:
    rows = await fetch(database_url, sql, *args)
    return rows[0][0] if rows else None


async def storage_of_readings(database_url: str) -> str:
    """The table that holds the numeric readings: ``readings`` itself, or the table behind it
    when ``readings`` is a view over a narrower storage table (``points``)."""
    kind = await fetchval(
        database_url, "SELECT relkind::text FROM pg_class WHERE oid = 'readings'::regclass"
    )
    return "points" if kind == "v" else "readings"
