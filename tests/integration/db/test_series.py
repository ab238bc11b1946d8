"""Storage v2 against a real PostgreSQL: series ids created once under racing writers, text
readings, device tags, status and units, the readings views, and the in-place migration of a
database filled by the earlier schema (also when interrupted)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from ingest.db import migrate as migrate_module
from ingest.db.dashboard import fold
from ingest.db.migrate import apply_migrations, load_migrations, migrate_dsn
from ingest.flow.writer import Writer
from ingest.model import Decoded, DeviceUpdate, Envelope, Reading, TextReading, device_status

if TYPE_CHECKING:
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]
T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def envelope(
    device: str,
    readings: Sequence[tuple[str, datetime, float]] = (),
    texts: Sequence[tuple[str, datetime, str]] = (),
    updates: Sequence[DeviceUpdate] = (),
) -> Envelope:
    rows = [Reading(device, m, ts, v) for m, ts, v in readings]
    text_rows = [TextReading(device, m, ts, v) for m, ts, v in texts]
    return Envelope(
        f"devices/{device}/telemetry", b"{}", T0, Decoded(rows, 0, text_rows, list(updates))
    )


def writer(dsn: str) -> Writer:
    return Writer(dsn=dsn, connect_timeout=5.0, write_timeout=10.0, backoff_max=0.5)


@asynccontextmanager
async def database(dsn: str) -> AsyncIterator[Conn]:
    await migrate_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def settle(db: Conn) -> None:
    while (await fold(db)).batches:
        pass


async def test_racing_writers_create_each_new_series_once(database_url: str) -> None:
    # Two workers see the same 200 new series at once, in opposite orders: one id each, no
    # error, no deadlock, every reading stored.
    keys = [(f"dev-{d:03d}", f"m{m}") for d in range(40) for m in range(5)]

    def batch(offset: int, reverse: bool) -> list[Envelope]:
        ordered = list(reversed(keys)) if reverse else keys
        ts = T0 + timedelta(seconds=offset)
        return [envelope(d, [(m, ts, 1.0)]) for d, m in ordered]

    async with database(database_url) as db, writer(database_url) as a, writer(database_url) as b:
        results = await asyncio.gather(a.write(batch(0, False)), b.write(batch(1, True)))
        series = await db.fetch("SELECT device_id, metric, count(*) AS n FROM series GROUP BY 1, 2")
        points = await db.fetchval("SELECT count(*) FROM readings")
        created = a.statistics().series_created + b.statistics().series_created
        cached = a.statistics().series_cached, b.statistics().series_cached
    assert [r.inserted for r in results] == [200, 200]
    assert sorted((r["device_id"], r["metric"]) for r in series) == sorted(keys)
    assert {r["n"] for r in series} == {1}
    assert points == 400
    assert created == 200  # each series made by one of them
    assert cached == (200, 200)


async def test_the_series_cache_is_bounded_and_counts_evictions(database_url: str) -> None:
    async with database(database_url) as db:
        async with Writer(dsn=database_url, series_cache_size=10) as small:
            for d in range(6):  # 6 devices x 3 metrics, in a cache of 10
                await small.write([envelope(f"d{d}", [(m, T0, 1.0) for m in "abc"])])
            again = await small.write([envelope("d0", [("a", T0 + timedelta(1), 2.0)])])
            stats = small.statistics()
        ids = await db.fetchval("SELECT count(DISTINCT id) FROM series WHERE device_id = 'd0'")
    assert stats.series_cached <= 10 and stats.series_evicted >= 3
    assert again.inserted == 1 and ids == 3  # looked up again, not created twice


async def test_text_readings_are_stored_and_folded_into_latest_text(database_url: str) -> None:
    t1 = T0 + timedelta(seconds=1)
    batch = [
        envelope("door-1", [("battery", T0, 3.1)], [("state", T0, "open"), ("fw", T0, "1.4.2")]),
        envelope("door-1", texts=[("state", t1, "closed")]),
        envelope("door-1", texts=[("state", T0 - timedelta(1), "late")]),  # older: not latest
        envelope("door-1", texts=[("state", T0, "duplicate")]),  # first write wins
    ]
    async with database(database_url) as db, writer(database_url) as w:
        result = await w.write(batch)
        await settle(db)
        texts = await db.fetch("SELECT metric, ts, value FROM text_readings ORDER BY 1, 2")
        latest = await db.fetch("SELECT metric, ts, value FROM latest_text ORDER BY 1")
        numeric = await db.fetch("SELECT metric, value FROM readings")
        device = await db.fetchrow("SELECT last_ts FROM devices WHERE device_id = 'door-1'")
    assert (result.inserted, result.duplicates) == (5, 1)
    assert [tuple(r) for r in texts] == [
        ("fw", T0, "1.4.2"),
        ("state", T0 - timedelta(1), "late"),
        ("state", T0, "open"),
        ("state", t1, "closed"),
    ]
    assert [tuple(r) for r in latest] == [("fw", T0, "1.4.2"), ("state", t1, "closed")]
    assert [tuple(r) for r in numeric] == [("battery", 3.1)]
    assert device is not None and device["last_ts"] == t1


async def test_tags_merge_newest_wins_per_key(database_url: str) -> None:
    first = DeviceUpdate("dev-1", tags={"site": "lyon", "line": "3"})
    second = DeviceUpdate("dev-1", tags={"line": "4", "building": "B"})
    async with database(database_url) as db, writer(database_url) as w:
        await w.write([envelope("dev-1", [("t", T0, 1.0)], updates=[first])])
        await w.write([envelope("dev-1", [("t", T0 + timedelta(1), 1.0)], updates=[second])])
        # The same tags again: nothing left to write (the row's xmin stays).
        xmin = await db.fetchval("SELECT xmin::text FROM devices WHERE device_id = 'dev-1'")
        await w.write([envelope("dev-1", [("t", T0 + timedelta(2), 1.0)], updates=[second])])
        same = await db.fetchval("SELECT xmin::text FROM devices WHERE device_id = 'dev-1'")
        tags = await db.fetchval("SELECT tags FROM devices WHERE device_id = 'dev-1'")
        await settle(db)
        folded = await db.fetchrow("SELECT tags, last_ts FROM devices WHERE device_id = 'dev-1'")
    assert json.loads(tags) == {"site": "lyon", "line": "4", "building": "B"}
    assert xmin == same
    assert folded is not None and json.loads(folded["tags"]) == json.loads(tags)
    assert folded["last_ts"] == T0 + timedelta(2)


async def test_status_is_set_only_when_newer(database_url: str) -> None:
    t1, t2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    async with database(database_url) as db, writer(database_url) as w:
        await w.write([envelope("node-1", updates=[device_status("node-1", "online", t1)])])
        first = await db.fetchrow("SELECT status, status_at, last_ts FROM devices")
        # In one batch: the newest of the batch wins, whatever the order.
        await w.write(
            [
                envelope("node-1", updates=[device_status("node-1", "offline", t2)]),
                envelope("node-1", updates=[device_status("node-1", "online", T0)]),
            ]
        )
        second = await db.fetchrow("SELECT status, status_at FROM devices")
        async with writer(database_url) as other:  # no memory of what was written
            await other.write([envelope("node-1", updates=[device_status("node-1", "online", t1)])])
        third = await db.fetchrow("SELECT status, status_at FROM devices")
    assert first is not None and tuple(first) == ("online", t1, None)
    assert second is not None and tuple(second) == ("offline", t2)
    assert third is not None and tuple(third) == ("offline", t2)  # older: ignored


async def test_units_are_set_on_the_series(database_url: str) -> None:
    async with database(database_url) as db, writer(database_url) as w:
        units = DeviceUpdate("dev-1", units={"temp": "°C", "rh": "%"})
        await w.write([envelope("dev-1", [("temp", T0, 21.5)], updates=[units])])
        changed = DeviceUpdate("dev-1", units={"temp": "K"})
        await w.write([envelope("dev-1", [("temp", T0 + timedelta(1), 294.6)], updates=[changed])])
        rows = await db.fetch("SELECT metric, unit FROM series ORDER BY 1")
    assert [tuple(r) for r in rows] == [("rh", "%"), ("temp", "K")]


async def test_insert_into_the_readings_views_creates_series(database_url: str) -> None:
    async with database(database_url) as db:
        await db.execute("INSERT INTO readings VALUES ('s1', 'm', $1, 1.5), ('s1', 'n', $1, 2)", T0)
        await db.execute("INSERT INTO text_readings VALUES ('s1', 'state', $1, 'on')", T0)
        with pytest.raises(asyncpg.UniqueViolationError):
            await db.execute("INSERT INTO readings VALUES ('s1', 'm', $1, 9)", T0)
        readings = await db.fetch("SELECT * FROM readings ORDER BY metric")
        texts = await db.fetch("SELECT * FROM text_readings")
        columns = await db.fetch(
            "SELECT table_name, string_agg(column_name || ' ' || data_type, ', '"
            " ORDER BY ordinal_position) AS c FROM information_schema.columns"
            " WHERE table_name IN ('readings', 'text_readings', 'latest_text')"
            " GROUP BY 1 ORDER BY 1"
        )
    assert [tuple(r) for r in readings] == [("s1", "m", T0, 1.5), ("s1", "n", T0, 2.0)]
    assert [tuple(r) for r in texts] == [("s1", "state", T0, "on")]
    public = "device_id text, metric text, ts timestamp with time zone, value"
    assert [tuple(r) for r in columns] == [
        ("latest_text", f"{public} text"),
        ("readings", f"{public} double precision"),
        ("text_readings", f"{public} text"),
    ]


# -- the v1 schema, migrated in place ------------------------------------------------------------

_V1_ROWS = 20_000


async def _fill_v1(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrations 0001-0005 only (the earlier schema), then rows written as it stored them."""
    v1 = [m for m in load_migrations() if m.version < "0006"]
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: v1)
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        today = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        await conn.execute(
            "SELECT ingest_create_partition('readings', $1)",
            today.replace(hour=0) - timedelta(days=1),
        )
        await conn.execute(
            "INSERT INTO readings (device_id, metric, ts, value)"
            " SELECT 'dev-' || (i % 100), 'm' || (i % 3), $1::timestamptz - i * interval '1 second', i"
            " FROM generate_series(1, $2) i",
            today,
            _V1_ROWS,
        )
        await conn.execute(
            "INSERT INTO latest_readings SELECT DISTINCT ON (device_id, metric) device_id,"
            " metric, ts, value FROM readings ORDER BY device_id, metric, ts DESC"
        )
        await conn.execute(
            "INSERT INTO devices SELECT device_id, min(ts), max(ts), max(ts) FROM readings"
            " GROUP BY 1"
        )
    finally:
        await conn.close()
    monkeypatch.undo()


_SNAPSHOT = (
    "SELECT (SELECT array_agg(r ORDER BY r) FROM (SELECT device_id, metric, ts, value"
    " FROM readings) r)::text, (SELECT array_agg(l ORDER BY l) FROM latest_readings l)::text,"
    " (SELECT array_agg(d ORDER BY d) FROM (SELECT device_id, first_seen, last_seen, last_ts"
    " FROM devices) d)::text"
)


async def test_a_filled_v1_database_is_migrated_in_place(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill_v1(database_url, monkeypatch)
    conn = await asyncpg.connect(database_url)
    try:
        before = await conn.fetchrow(_SNAPSHOT)
        old_parts = await conn.fetchval(
            "SELECT array_agg(relname::text ORDER BY 1) FROM pg_class WHERE relname ~ '^readings_p' AND relkind = 'r'"
        )
        applied = await apply_migrations(conn)
        after = await conn.fetchrow(_SNAPSHOT)
        parts = await conn.fetchval(
            "SELECT array_agg(c.relname::text ORDER BY 1) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'points'::regclass"
        )
        series = await conn.fetchval("SELECT count(*) FROM series")
    finally:
        await conn.close()
    assert applied == ["0006_series"] or applied[0] == "0006_series"
    assert before is not None and after is not None and tuple(after) == tuple(before)
    assert [p.replace("readings", "points", 1) for p in old_parts] == [
        p for p in parts if p != "points_default"
    ]
    assert series == 300


async def test_an_interrupted_migration_rolls_back_and_a_rerun_completes(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _fill_v1(database_url, monkeypatch)
    blocker = await asyncpg.connect(database_url)
    victim = await asyncpg.connect(database_url)
    try:
        before = await blocker.fetchrow(_SNAPSHOT)
        # A reader of devices holds the migration at its last step, after the copy.
        await blocker.execute("BEGIN; LOCK TABLE devices IN ACCESS SHARE MODE")
        task = asyncio.create_task(apply_migrations(victim))
        pid = victim.get_server_pid()
        for _ in range(6000):  # until the migration waits for the lock (not a timing check)
            if await blocker.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
            ):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the migration never waited for the lock on devices")
        await blocker.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await task
        await blocker.execute("ROLLBACK")
        midway = await blocker.fetchval("SELECT to_regclass('points') IS NULL")
        applied = await apply_migrations(blocker)
        after = await blocker.fetchrow(_SNAPSHOT)
    finally:
        await blocker.close()
        victim.terminate()
    assert midway  # rolled back whole: no points, readings still the v1 table
    assert "0006_series" in applied
    assert before is not None and after is not None and tuple(after) == tuple(before)
