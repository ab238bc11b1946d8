"""The dashboard database against a real PostgreSQL: exactly-once rollups and latest values
under redelivery, duplicates, late samples, rejected rows and concurrent writers and folders; time partitions
created ahead and dropped by retention; upgrading an installation whose readings table is not
partitioned yet."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import asyncpg
import pytest

from ingest.db.dashboard import fold, fold_forever
from ingest.db.migrate import apply_migrations, load_migrations, migrate_dsn
from ingest.db.partitions import apply_retention, ensure_partitions, maintain
from ingest.flow.writer import Writer
from ingest.model import Decoded, Envelope, Reading
from ingest.settings import Settings, parse_retention

pytestmark = pytest.mark.anyio

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
RECEIVED = datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC)
if TYPE_CHECKING:
    # Generic only in the stubs; at run time the annotations stay strings.
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]

# What the dashboard tables must hold, computed from readings itself (each row once).
_ROLLUPS_FROM_READINGS = """
    SELECT device_id, metric, date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00') AS bucket,
           count(*)::integer AS n, sum(value) AS sum, min(value) AS min, max(value) AS max
    FROM readings GROUP BY 1, 2, 3
"""
_ROWS = "SELECT device_id, metric, ts, value FROM readings ORDER BY 1, 2, 3"
_FLEET_FROM_READINGS = """
    SELECT metric, date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00') AS bucket,
           count(*) AS n, sum(value) AS sum, min(value) AS min, max(value) AS max
    FROM readings GROUP BY 1, 2
"""
_LATEST_FROM_READINGS = """
    SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value
    FROM readings ORDER BY device_id, metric, ts DESC
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def message(device: str, *readings: tuple[str, datetime, float]) -> Envelope:
    rows = [Reading(device, metric, ts, value) for metric, ts, value in readings]
    return Envelope(
        f"devices/{device}/telemetry", repr(readings).encode(), RECEIVED, Decoded(rows, 0)
    )


def samples(
    devices: Iterable[int], start: datetime, count: int, step_s: float = 7.0
) -> list[Envelope]:
    """``count`` messages per device, two metrics each, ``step_s`` seconds apart."""
    return [
        message(
            f"dev-{d:03d}",
            ("temp", start + timedelta(seconds=i * step_s), float(d * 1000 + i)),
            ("rh", start + timedelta(seconds=i * step_s), float(i % 7)),
        )
        for i in range(count)
        for d in devices
    ]


def quick_writer(dsn: str) -> Writer:
    return Writer(
        dsn=dsn,
        connect_timeout=5.0,
        write_timeout=20.0,
        backoff_initial=0.02,
        backoff_max=0.1,
    )


async def settle(db: Conn) -> int:
    """Fold every pending batch (what the daemon's folder does within a second); returns how
    many."""
    total = 0
    while batches := (await fold(db, max_batches=7)).batches:
        total += batches
    return total


@asynccontextmanager
async def database(dsn: str) -> AsyncIterator[Conn]:
    await migrate_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


def _by_key(rows: Iterable[asyncpg.Record], width: int) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    return {tuple(r.values())[:width]: tuple(r.values())[width:] for r in rows}


async def rollups(db: Conn) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    return _by_key(
        await db.fetch("SELECT device_id, metric, bucket, n, sum, min, max FROM readings_1m"), 3
    )


async def latest(db: Conn) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    return _by_key(await db.fetch("SELECT device_id, metric, ts, value FROM latest_readings"), 2)


async def assert_consistent(db: Conn) -> None:
    """readings_1m, latest_readings and devices say exactly what readings holds."""
    assert await rollups(db) == _by_key(await db.fetch(_ROLLUPS_FROM_READINGS), 3)
    assert await latest(db) == _by_key(await db.fetch(_LATEST_FROM_READINGS), 2)
    devices = await db.fetch(
        "SELECT d.device_id, d.last_ts, r.max_ts FROM devices d FULL JOIN"
        " (SELECT device_id, max(ts) AS max_ts FROM readings GROUP BY 1) r USING (device_id)"
    )
    assert devices and all(r["last_ts"] == r["max_ts"] for r in devices)
    fleet = await db.fetch("SELECT metric, bucket, n, sum, min, max FROM readings_fleet_1m")
    assert _by_key(fleet, 2) == _by_key(await db.fetch(_FLEET_FROM_READINGS), 2)


def expected_rollups(envelopes: Iterable[Envelope]) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Rollups computed in Python from each distinct (device, metric, ts) once, first wins."""
    first: dict[tuple[str, str, datetime], float] = {}
    for e in envelopes:
        assert isinstance(e.result, Decoded)
        for r in e.result.readings:
            first.setdefault((r.device_id, r.metric, r.ts), r.value)
    out: dict[tuple[Any, ...], list[Any]] = {}
    for (device, metric, ts), value in first.items():
        key = (device, metric, ts.replace(second=0, microsecond=0))
        agg = out.setdefault(key, [0, 0.0, value, value])
        agg[0] += 1
        agg[1] += value
        agg[2] = min(agg[2], value)
        agg[3] = max(agg[3], value)
    return {k: tuple(v) for k, v in out.items()}


# -- exactly-once -------------------------------------------------------------------------------


async def test_redelivered_batches_and_duplicates_count_once(
    database_url: str,
) -> None:
    first = samples(range(10), T0, 12)
    fresh = samples(range(10), T0 + timedelta(minutes=5), 6)
    # Redelivered whole; then part of it again mixed with new messages, one of them twice in
    # the same batch, and a different value for a key already stored (the first write wins).
    changed = message("dev-000", ("temp", T0, 999.0))
    second = [*first[:30], *fresh, fresh[0], changed]
    async with database(database_url) as db, quick_writer(database_url) as writer:
        one = await writer.write(first)
        await settle(db)
        once = (await rollups(db), await latest(db))
        again = await writer.write(first)
        await settle(db)
        assert (await rollups(db), await latest(db)) == once, "a redelivery changed them"
        two = await writer.write(second)
        await settle(db)
        await assert_consistent(db)
        got = await rollups(db)
        devices = await db.fetchval("SELECT count(*) FROM devices")

    assert (one.inserted, again.inserted, again.duplicates) == (240, 0, 240)
    assert (two.inserted, two.duplicates) == (120, 60 + 2 + 1)
    assert got == expected_rollups([*first, *second])
    assert devices == 10


async def test_late_samples_land_in_their_bucket_and_never_regress_latest(
    database_url: str,
) -> None:
    now = T0 + timedelta(minutes=30)
    async with database(database_url) as db, quick_writer(database_url) as writer:
        await writer.write(samples(range(3), now, 4))
        await settle(db)
        before = await latest(db)
        last_ts = await db.fetchval("SELECT last_ts FROM devices WHERE device_id = 'dev-001'")
        # Late: half an hour old, within one batch with a newer sample of another device.
        late = [
            message("dev-001", ("temp", T0 + timedelta(seconds=10), -5.0), ("rh", T0, 50.0)),
            message("dev-001", ("temp", T0 + timedelta(seconds=70), 7.0)),
            message("dev-002", ("temp", now + timedelta(minutes=1), 123.0)),
        ]
        await writer.write(late)
        # A redelivery of the newest sample with a different value changes nothing either.
        await writer.write([message("dev-002", ("temp", now + timedelta(minutes=1), 0.0))])
        await settle(db)
        await assert_consistent(db)
        after = await latest(db)
        buckets = await db.fetch(
            "SELECT bucket, n, sum FROM readings_1m WHERE device_id = 'dev-001' AND metric = 'temp'"
            " ORDER BY bucket"
        )
        device = await db.fetchrow("SELECT last_ts FROM devices WHERE device_id = 'dev-001'")

    assert after[("dev-001", "temp")] == before[("dev-001", "temp")]
    assert after[("dev-001", "rh")] == before[("dev-001", "rh")]
    assert after[("dev-002", "temp")] == (now + timedelta(minutes=1), 123.0)
    assert [(b["bucket"], b["n"], b["sum"]) for b in buckets][:2] == [
        (T0, 1, -5.0),
        (T0 + timedelta(minutes=1), 1, 7.0),
    ]
    assert device is not None and device["last_ts"] == last_ts


async def test_devices_are_kept_current_once_per_batch(
    database_url: str,
) -> None:
    async with database(database_url) as db, quick_writer(database_url) as writer:
        await writer.write(samples(range(3), T0, 5))
        await settle(db)
        first = {r["device_id"]: r for r in await db.fetch("SELECT * FROM devices")}
        await asyncio.sleep(0.05)
        await writer.write(samples([1], T0 + timedelta(hours=1), 2))
        await settle(db)
        await writer.write(samples([1], T0, 5))  # all duplicates: the device did not speak
        await settle(db)
        later = {r["device_id"]: r for r in await db.fetch("SELECT * FROM devices")}
        xmins = await db.fetchval("SELECT count(DISTINCT xmin::text) FROM devices")

    assert set(first) == set(later) == {"dev-000", "dev-001", "dev-002"}
    assert first["dev-001"]["first_seen"] == later["dev-001"]["first_seen"]
    assert later["dev-001"]["last_seen"] > first["dev-001"]["last_seen"]
    assert later["dev-001"]["last_ts"] == T0 + timedelta(hours=1, seconds=7)
    assert later["dev-000"] == first["dev-000"]
    assert first["dev-000"]["last_ts"] == T0 + timedelta(seconds=28)
    assert xmins == 2


async def test_rejected_rows_leave_no_trace_in_the_dashboard(
    database_url: str,
) -> None:
    batch = samples(range(8), T0, 5)
    bad = T0 + timedelta(seconds=7)
    batch[13] = message("dev-005", ("temp", bad, 1.0), ("rh", bad, 5e6))
    async with database(database_url) as db:
        await db.execute("ALTER TABLE points ADD CONSTRAINT v CHECK (value < 1e6)")
        async with quick_writer(database_url) as writer:
            result = await writer.write(batch)
            redelivered = await writer.write(batch)  # conflict-safe path + the same rejection
        await settle(db)
        await assert_consistent(db)
        got = await rollups(db)
        pending = await db.fetchval("SELECT count(*) FROM dashboard_pending")

    assert result.dead_reasons == {"rejected_by_database": 1}
    assert result.inserted == redelivered.duplicates == 39 * 2
    assert redelivered.inserted == 0
    assert got == expected_rollups(e for i, e in enumerate(batch) if i != 13)
    assert pending == 0


async def test_concurrent_writers_and_folders_do_not_deadlock(
    database_url: str,
) -> None:
    """Two writers on the same devices, metrics and minutes in opposite orders, and two
    folders meeting, folding while they write."""
    rounds, devices = 20, 100

    def batch(r: int, reverse: bool) -> list[Envelope]:
        ts = T0 + timedelta(seconds=r, milliseconds=500 if reverse else 0)
        order = range(devices - 1, -1, -1) if reverse else range(devices)
        return [
            message(f"dev-{d:03d}", *((f"m{k}", ts, float(d + k)) for k in range(5))) for d in order
        ]

    async with database(database_url) as db:
        folders = [await asyncpg.connect(database_url) for _ in range(2)]
        try:
            async with (
                quick_writer(database_url) as w1,
                quick_writer(database_url) as w2,
            ):
                writing = 2

                async def write(writer: Writer, reverse: bool) -> None:
                    nonlocal writing
                    for r in range(rounds):
                        await writer.write(batch(r, reverse))
                    writing -= 1

                async def folder(conn: Conn) -> None:
                    while writing:
                        await fold(conn, max_batches=3)
                        await asyncio.sleep(0.005)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write, w1, False)
                    tg.start_soon(write, w2, True)
                    for conn in folders:
                        tg.start_soon(folder, conn)
                retries = [w.statistics().retries_by_class for w in (w1, w2)]
        finally:
            for conn in folders:
                await conn.close()
        await settle(db)
        await assert_consistent(db)
        total = await db.fetchval("SELECT sum(n) FROM readings_1m")
        deadlocks = await db.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )

    assert retries == [{}, {}], "a writer had to retry (deadlock?)"
    assert total == 2 * rounds * devices * 5
    assert deadlocks == 0


async def test_deferred_batches_are_folded_once(database_url: str) -> None:
    async with database(database_url) as db, quick_writer(database_url) as writer:
        for i in range(12):
            await writer.write(samples(range(4), T0 + timedelta(minutes=i), 3))
        before = await db.fetchval("SELECT count(*) FROM readings_1m")
        pending = await db.fetch("SELECT * FROM dashboard_pending ORDER BY batch")
        tags = await db.fetch("SELECT batch, count(*) AS n FROM points GROUP BY 1 ORDER BY 1")
        # Three readings per series and minute: each batch handed the fold its aggregates.
        staged = await db.fetch(
            "SELECT batch, sum(n)::integer AS n, count(*) AS rows FROM dashboard_staged"
            " GROUP BY 1 ORDER BY 1"
        )
        folds = [await fold(db, max_batches=5) for _ in range(4)]
        staged_after = await db.fetchval("SELECT count(*) FROM dashboard_staged")
        await assert_consistent(db)

    assert before == 0, "deferred: nothing before the fold"
    assert [(t["batch"], t["n"]) for t in tags] == [(p["batch"], 24) for p in pending]
    assert pending[0]["min_ts"] == T0 and pending[0]["max_ts"] == T0 + timedelta(seconds=14)
    assert [(f.batches, f.rows) for f in folds] == [(5, 120), (5, 120), (2, 48), (0, 0)]
    assert [tuple(r) for r in staged] == [(p["batch"], 24, 8) for p in pending]
    assert staged_after == 0  # folded batches leave nothing behind


async def test_fold_forever_folds_and_survives_an_unreachable_database(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.dashboard")
    async with database(database_url) as db, quick_writer(database_url) as writer:
        settings = Settings(database_url=database_url, dashboard_interval=0.05)
        async with anyio.create_task_group() as tg:
            tg.start_soon(fold_forever, database_url, settings, log)
            await writer.write(samples(range(2), T0, 3))
            for _ in range(200):  # 10 s at most
                if await db.fetchval("SELECT count(*) FROM devices"):
                    break
                await asyncio.sleep(0.05)
            tg.cancel_scope.cancel()
        await assert_consistent(db)

    dead = "postgresql://postgres@127.0.0.1:1/nothing"
    with caplog.at_level(logging.WARNING, logger="test.dashboard"), anyio.move_on_after(1.0):
        await fold_forever(dead, Settings(database_url=dead, db_connect_timeout=0.5), log)
    assert "dashboard fold failed" in caplog.text


# -- partitions and retention -------------------------------------------------------------------


async def partitions(db: Conn, parent: str) -> list[str]:
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::text::regclass ORDER BY 1",
        parent,
    )
    return [r["relname"] for r in rows]


async def test_partitions_are_created_ahead(database_url: str) -> None:
    now = datetime(2024, 5, 30, 23, 30, tzinfo=UTC)
    async with database(database_url) as db:
        # A sample dated ahead of any partition lands in the default one...
        async with quick_writer(database_url) as writer:
            await writer.write([message("dev-1", ("t", datetime(2024, 6, 1, 8, tzinfo=UTC), 1.0))])
        await settle(db)
        created = await ensure_partitions(db, days_ahead=3, now=now)
        again = await ensure_partitions(db, days_ahead=3, now=now)
        readings = await partitions(db, "points")
        rollup_parts = await partitions(db, "readings_1m")
        # ... and moves into its partition when that is created.
        where = await db.fetchval("SELECT tableoid::regclass::text FROM points")
        where_1m = await db.fetchval("SELECT tableoid::regclass::text FROM readings_1m")
        pkeys = await db.fetchval(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'points_p20240601'"
            " AND indexdef LIKE '%(series_id, ts)'"
        )
        # Both instances at once: one creates, the other finds nothing left to do.
        other = await asyncpg.connect(database_url)
        try:
            later = datetime(2024, 6, 10, tzinfo=UTC)
            a, b = await asyncio.gather(
                ensure_partitions(db, days_ahead=1, now=later),
                ensure_partitions(other, days_ahead=1, now=later),
            )
        finally:
            await other.close()

    days = ("20240530", "20240531", "20240601", "20240602")
    assert created == [
        *(f"points_p{d}" for d in days), *(f"text_points_p{d}" for d in days),
        "readings_1m_p202405", "readings_1m_p202406",
    ]  # fmt: skip
    assert again == []
    assert readings == ["points_default", *created[:4]]
    assert rollup_parts == ["readings_1m_default", "readings_1m_p202405", "readings_1m_p202406"]
    assert (where, where_1m) == ("points_p20240601", "readings_1m_p202406")
    assert pkeys == 1
    assert sorted(a + b) == [
        "points_p20240610", "points_p20240611", "text_points_p20240610", "text_points_p20240611"
    ]  # fmt: skip


async def test_retention_drops_only_what_it_should(database_url: str) -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    async with database(database_url) as db:
        await ensure_partitions(db, days_ahead=40, now=start)
        async with quick_writer(database_url) as writer:
            for day in range(40):  # May 1 to June 9, two samples at noon, one late at 23:59
                ts = start + timedelta(days=day, hours=12)
                await writer.write(
                    [
                        message("dev-1", ("t", ts, 1.0), ("u", ts, 2.0)),
                        message("dev-1", ("t", ts + timedelta(hours=11, minutes=59), 3.0)),
                    ]
                )
            # A very old sample (no partition): the default partition keeps it.
            await writer.write([message("dev-1", ("t", datetime(2023, 1, 1, tzinfo=UTC), 9.0))])
        await settle(db)
        rollups_before = await db.fetchval("SELECT sum(n) FROM readings_1m")
        now = datetime(2024, 6, 10, 6, tzinfo=UTC)
        dropped = await apply_retention(
            db, retention=timedelta(days=10), rollup_retention=None, now=now
        )
        left = await db.fetch(
            "SELECT date(ts AT TIME ZONE 'UTC') AS day, count(*) FROM readings GROUP BY 1 ORDER BY 1"
        )
        rollups_after = await db.fetchval("SELECT sum(n) FROM readings_1m")
        latest_after = await db.fetchval("SELECT count(*) FROM latest_readings")
        # Later, the rollups expire too, by whole months.
        dropped_1m = await apply_retention(
            db, retention=timedelta(days=10), rollup_retention=timedelta(days=30), now=now
        )
        months = await db.fetch(
            "SELECT DISTINCT date_trunc('month', bucket AT TIME ZONE 'UTC') AS m FROM readings_1m ORDER BY 1"
        )

    # Cutoff 2024-05-31 06:00: the partitions of May 1 to May 30 end before it, May 31's not.
    assert dropped == [
        *(f"points_p202405{d:02d}" for d in range(1, 31)),
        *(f"text_points_p202405{d:02d}" for d in range(1, 31)),
    ]
    assert [r["day"].isoformat() for r in left] == [
        "2024-05-31",
        *(f"2024-06-{d:02d}" for d in range(1, 10)),
    ]
    assert all(r["count"] == 3 for r in left)
    assert rollups_after == rollups_before == 40 * 3 + 1 - 0  # the rollups survive
    assert latest_after == 2
    # Rollup cutoff 2024-05-11 06:00: no month ends before it; the 2023 bucket in the default
    # partition is deleted.
    assert dropped_1m == []
    assert [m["m"].month for m in months] == [5, 6]


async def test_rollup_partitions_expire_by_month(database_url: str) -> None:
    async with database(database_url) as db:
        await ensure_partitions(db, days_ahead=70, now=datetime(2024, 5, 1, tzinfo=UTC))
        async with quick_writer(database_url) as writer:
            for month in (5, 6, 7):
                ts = datetime(2024, month, 15, tzinfo=UTC)
                await writer.write([message("dev-1", ("t", ts, float(month)))])
        await settle(db)
        dropped = await apply_retention(
            db,
            retention=timedelta(days=7),
            rollup_retention=timedelta(days=30),
            now=datetime(2024, 8, 1, tzinfo=UTC),
        )
        months = [
            r["n"]
            for r in await db.fetch(
                "SELECT sum(n) AS n FROM readings_1m GROUP BY bucket ORDER BY bucket"
            )
        ]
        raw = await db.fetchval("SELECT count(*) FROM readings")
        fleet = await db.fetchval("SELECT array_agg(n) FROM readings_fleet_1m")

    assert dropped == [
        *(f"points_p{date(2024, 5, 1) + timedelta(days=i):%Y%m%d}" for i in range(71)),
        *(f"text_points_p{date(2024, 5, 1) + timedelta(days=i):%Y%m%d}" for i in range(71)),
        "readings_1m_p202405",
        "readings_1m_p202406",
    ]
    assert months == [1]  # July's rollup is left
    assert raw == 0
    assert fleet == [1]


async def test_maintain_runs_at_start_and_survives_an_unreachable_database(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.partitions")
    async with database(database_url) as db:
        settings = Settings(database_url=database_url, retention="30d", partition_days_ahead=2)
        with anyio.move_on_after(3):
            await maintain(database_url, settings, log)
        names = await partitions(db, "points")
    today = datetime.now(UTC).date()
    assert names == [
        "points_default",
        *(f"points_p{today + timedelta(days=d):%Y%m%d}" for d in range(3)),
    ]

    dead = "postgresql://postgres@127.0.0.1:1/nothing"
    with caplog.at_level(logging.WARNING, logger="test.partitions"), anyio.move_on_after(1.5):
        await maintain(dead, Settings(database_url=dead, db_connect_timeout=0.5), log)
    assert "partition maintenance failed" in caplog.text


def test_retention_setting_parses() -> None:
    assert parse_retention("30d") == timedelta(days=30)
    assert parse_retention(" 12W ") == timedelta(weeks=12)
    assert parse_retention("36h") == timedelta(hours=36)
    assert parse_retention(None) is parse_retention("forever") is parse_retention("") is None
    for bad in ("30", "d", "0d", "-1d", "1.5d", "30m"):
        with pytest.raises(ValueError):
            parse_retention(bad)


# -- upgrading an installation with data ---------------------------------------------------------


async def test_migrating_an_unpartitioned_installation_keeps_its_data(database_url: str) -> None:
    now = datetime.now(UTC)
    tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    old = [
        (f"dev-{d}", m, now - timedelta(days=2, minutes=i), float(i + d))
        for d in range(5)
        for m in ("temp", "rh")
        for i in range(50)
    ]
    future = ("dev-0", "temp", now + timedelta(days=3), 42.0)  # a clock far ahead
    conn = await asyncpg.connect(database_url)
    try:
        # The previous version: 0001 applied and recorded, rows written.
        initial = load_migrations()[0]
        await conn.execute(
            "CREATE TABLE schema_migrations (version text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(initial.sql)
        await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", initial.version)
        await conn.copy_records_to_table("readings", records=[*old, future])
        before = await conn.fetch(_ROWS)

        applied = await apply_migrations(conn)

        after = await conn.fetch(_ROWS)
        kind = await conn.fetchval("SELECT relkind FROM pg_class WHERE oid = 'readings'::regclass")
        parts = await partitions(conn, "points")
        bound = await conn.fetchval(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'points_legacy'"
        )
        legacy_rows = await conn.fetchval("SELECT count(*) FROM points_legacy")
        pkey = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = 'points'::regclass AND contype = 'p'"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO readings VALUES ($1, $2, $3, $4)", *old[7])
        await assert_consistent(conn)
        # Today is in readings_legacy (up to midnight): ensure_partitions starts after it.
        created = await ensure_partitions(conn, days_ahead=2, now=now)
    finally:
        await conn.close()
    # The daemon goes on: a redelivery of old rows is recognised, new rows count.
    async with quick_writer(database_url) as writer:
        redelivered = await writer.write([message(*old[0][:1], (old[0][1], old[0][2], 0.0))])
        fresh = await writer.write([message("dev-9", ("temp", now, 1.0))])
    conn = await asyncpg.connect(database_url)
    try:
        await settle(conn)
        await assert_consistent(conn)
    finally:
        await conn.close()

    assert applied == [m.version for m in load_migrations()[1:]]
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert kind == b"v"  # a view over points (migrations/0006_series.sql)
    assert parts[:2] == ["points_default", "points_legacy"]
    assert bound is not None and bound.startswith("FOR VALUES FROM (MINVALUE) TO (")
    assert legacy_rows == len(old)  # the future row moved out (default, then its partition)
    assert pkey == "PRIMARY KEY (series_id, ts)"
    assert f"points_p{tomorrow:%Y%m%d}" in created
    assert f"points_p{now:%Y%m%d}" not in created
    assert (redelivered.inserted, redelivered.duplicates, fresh.inserted) == (0, 1, 1)


async def test_batches_with_and_without_staged_aggregates_fold_together_exactly_once(
    database_url: str,
) -> None:
    """A batch of several readings per series and minute hands the fold its aggregates; one of
    a reading per series, a batch redone conflict-safe and one holding a value summed in
    numeric do not, and the fold reads their points. Folded together, each counts once."""
    async with database(database_url) as db, quick_writer(database_url) as writer:
        await writer.write(samples(range(3), T0, 4))  # 4 readings per series: staged
        await writer.write(samples(range(3, 9), T0, 1))  # 1 per series: read back
        redelivered = samples(range(2), T0, 4) + samples(range(9, 10), T0, 4)
        await writer.write(redelivered)  # duplicates: conflict-safe, read back
        # Four readings of one series, but summed in numeric: read back.
        await writer.write(
            [message("dev-100", ("temp", T0 + timedelta(seconds=i), 1e300)) for i in range(4)]
        )
        staged = await db.fetchval("SELECT count(DISTINCT batch) FROM dashboard_staged")
        pending = await db.fetchval("SELECT count(*) FROM dashboard_pending")
        assert await settle(db) == 4
        left = await db.fetchval("SELECT count(*) FROM dashboard_staged")
        await assert_consistent(db)
    assert (staged, pending, left) == (1, 4, 0)
