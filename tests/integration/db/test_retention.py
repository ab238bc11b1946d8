"""Retention of what is not partitioned, against a real PostgreSQL: dead letters past
INGEST_DEAD_LETTER_RETENTION, and the devices (with their latest values) unseen for longer than
INGEST_RETENTION, removed by the maintenance task."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from ingest.db import partitions
from ingest.db.migrate import migrate_dsn
from ingest.db.partitions import Pruned, prune, run_once
from ingest.settings import Settings

pytestmark = pytest.mark.anyio

if TYPE_CHECKING:
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def database(dsn: str) -> AsyncIterator[Conn]:
    await migrate_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def add_dead_letters(db: Conn, *ages_days: float) -> None:
    now = datetime.now(UTC)
    await db.executemany(
        "INSERT INTO dead_letters (received_at, topic, payload, error, reason)"
        " VALUES ($1, 't', '\\x00', 'e', 'not_json')",
        [(now - timedelta(days=age),) for age in ages_days],
    )


async def add_device(db: Conn, device: str, seen_days_ago: float) -> None:
    seen = datetime.now(UTC) - timedelta(days=seen_days_ago)
    await db.execute("INSERT INTO devices VALUES ($1, $2, $2, $2)", device, seen)
    await db.executemany(
        "INSERT INTO latest_readings VALUES ($1, $2, $3, 1.0)",
        [(device, metric, seen) for metric in ("t", "rh")],
    )


async def test_dead_letters_expire_in_chunks(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(partitions, "DEAD_LETTER_CHUNK", 3)
    async with database(database_url) as db:
        await add_dead_letters(db, *([40.0] * 7), 29.0, 1.0, 0.0)
        now = datetime.now(UTC)
        kept_forever = await prune(db, retention=None, dead_letter_retention=None, now=now)
        after_forever = await db.fetchval("SELECT count(*) FROM dead_letters")
        pruned = await prune(db, retention=None, dead_letter_retention=timedelta(days=30), now=now)
        left = await db.fetch("SELECT received_at FROM dead_letters ORDER BY 1")

    assert (kept_forever, after_forever) == (Pruned(), 10)
    assert pruned == Pruned(dead_letters=7)
    assert len(left) == 3 and all(r["received_at"] > now - timedelta(days=30) for r in left)


async def test_devices_unseen_for_the_raw_retention_are_pruned_with_their_latest_values(
    database_url: str,
) -> None:
    async with database(database_url) as db:
        await add_device(db, "dev-gone", 31)
        await add_device(db, "dev-quiet", 29)
        await add_device(db, "dev-live", 0)
        old = datetime.now(UTC) - timedelta(days=40)
        await db.execute(
            "INSERT INTO dashboard_failed (batch, stored_at, min_ts, max_ts, error)"
            " VALUES (1, $1, $1, $1, 'e'), (2, now(), now(), now(), 'e')",
            old,
        )
        now = datetime.now(UTC)
        forever = await prune(db, retention=None, dead_letter_retention=None, now=now)
        pruned = await prune(db, retention=timedelta(days=30), dead_letter_retention=None, now=now)
        devices = {r[0] for r in await db.fetch("SELECT device_id FROM devices")}
        latest = {r[0] for r in await db.fetch("SELECT DISTINCT device_id FROM latest_readings")}
        failed = [r[0] for r in await db.fetch("SELECT batch FROM dashboard_failed")]

    assert forever == Pruned()
    assert pruned == Pruned(devices=1, set_aside=1)
    assert devices == latest == {"dev-quiet", "dev-live"}
    assert failed == [2]


async def test_the_maintenance_round_prunes_with_the_settings(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with database(database_url) as db:
        await add_dead_letters(db, 3.0, 1.0, 0.0)
        await add_device(db, "dev-gone", 8)
        await add_device(db, "dev-live", 0)
        settings = Settings(
            database_url=database_url,
            retention="7d",
            dead_letter_retention=timedelta(days=2),
            partition_days_ahead=1,
        )
        log = logging.getLogger("test.retention")
        with caplog.at_level(logging.INFO, logger="test.retention"):
            await run_once(database_url, settings, log)
        dead = await db.fetchval("SELECT count(*) FROM dead_letters")
        devices = [r[0] for r in await db.fetch("SELECT device_id FROM devices")]

    assert dead == 2
    assert devices == ["dev-live"]
    assert "pruned (retention): 1 dead letters, 1 devices" in caplog.text
