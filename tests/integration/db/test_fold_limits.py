"""The dashboard fold against a real PostgreSQL with values at the limits of a double, and with
batches that cannot be folded: it goes on for the rest of the fleet, and says what happened."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

import anyio
import asyncpg
import pytest

from ingest.db.dashboard import Folder, fold
from ingest.db.migrate import migrate_dsn
from ingest.flow.writer import Writer
from ingest.model import Decoded, Envelope, Reading
from ingest.settings import Settings

pytestmark = pytest.mark.anyio

MAX = sys.float_info.max
NOW = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
if TYPE_CHECKING:
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def message(device: str, *readings: tuple[str, datetime, float]) -> Envelope:
    rows = [Reading(device, metric, ts, value) for metric, ts, value in readings]
    return Envelope(f"devices/{device}/telemetry", b"{}", NOW, Decoded(rows, 0))


def writer(dsn: str) -> Writer:
    return Writer(
        dsn=dsn,
        connect_timeout=5.0,
        write_timeout=20.0,
        backoff_initial=0.02,
        backoff_max=0.1,
    )


@asynccontextmanager
async def database(dsn: str) -> AsyncIterator[Conn]:
    await migrate_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def until(condition: Callable[[], bool]) -> None:
    """Polls (the folder's statistics); the test's own timeout bounds it."""
    for _ in range(2400):
        if condition():
            return
        await anyio.sleep(0.05)
    raise AssertionError("condition never met")


async def settle(db: Conn) -> None:
    while (await fold(db)).batches:
        pass


@pytest.mark.parametrize("value", [1e308, -1e308, MAX, -MAX])
async def test_values_that_overflow_a_sum_never_stop_the_fold(
    database_url: str, value: float
) -> None:
    sign = 1.0 if value > 0 else -1.0
    ts = [NOW + timedelta(seconds=s) for s in range(4)]
    async with database(database_url) as db, writer(database_url) as w:
        # Two devices in one minute (the fleet rollup adds them), then each device again in
        # that minute (the device rollups add to what they hold), then ordinary values.
        await w.write(
            [message("dev-a", ("v", ts[0], value)), message("dev-b", ("v", ts[0], value))]
        )
        await settle(db)
        await w.write(
            [message("dev-a", ("v", ts[1], value)), message("dev-b", ("v", ts[1], value))]
        )
        await w.write([message("dev-a", ("v", ts[2], value), ("w", ts[2], 1.5))])
        await w.write([message("dev-c", ("v", ts[3], 2.0), ("w", ts[3], 2.5))])
        await settle(db)
        latest = await db.fetch("SELECT device_id, metric, ts, value FROM latest_readings")
        rollups = await db.fetch("SELECT device_id, metric, n, sum, min, max FROM readings_1m")
        fleet = await db.fetch("SELECT metric, n, sum, min, max FROM readings_fleet_1m")
        devices = await db.fetch("SELECT device_id, last_ts FROM devices")
        pending = await db.fetchval("SELECT count(*) FROM dashboard_pending")
        failed = await db.fetchval("SELECT count(*) FROM dashboard_failed")
        summary = await db.fetch("SELECT metric, readings, avg FROM fleet_summary_1h")

    assert {(r["device_id"], r["metric"]): (r["ts"], r["value"]) for r in latest} == {
        ("dev-a", "v"): (ts[2], value),
        ("dev-a", "w"): (ts[2], 1.5),
        ("dev-b", "v"): (ts[1], value),
        ("dev-c", "v"): (ts[3], 2.0),
        ("dev-c", "w"): (ts[3], 2.5),
    }
    saturated = sign * MAX
    assert {(r["device_id"], r["metric"]): tuple(r.values())[2:] for r in rollups} == {
        ("dev-a", "v"): (3, saturated, value, value),
        ("dev-a", "w"): (1, 1.5, 1.5, 1.5),
        ("dev-b", "v"): (2, saturated, value, value),
        ("dev-c", "v"): (1, 2.0, 2.0, 2.0),
        ("dev-c", "w"): (1, 2.5, 2.5, 2.5),
    }
    lo, hi = min(value, 2.0), max(value, 2.0)
    assert {r["metric"]: tuple(r.values())[1:] for r in fleet} == {
        "v": (6, saturated, lo, hi),
        "w": (2, 4.0, 1.5, 2.5),
    }
    assert {r["device_id"]: r["last_ts"] for r in devices} == {
        "dev-a": ts[2],
        "dev-b": ts[1],
        "dev-c": ts[3],
    }
    assert (pending, failed) == (0, 0)
    assert {r["metric"]: r["readings"] for r in summary} == {"v": 6, "w": 2}
    assert abs(next(r["avg"] for r in summary if r["metric"] == "v")) <= MAX


async def test_mixed_huge_values_saturate_and_small_ones_stay_exact(database_url: str) -> None:
    ts = [NOW + timedelta(seconds=s) for s in range(6)]
    values = [MAX, MAX, -1e308, 0.1, 0.2, 1e290]
    async with database(database_url) as db, writer(database_url) as w:
        for t, v in zip(ts, values, strict=True):
            await w.write([message("dev-a", ("v", t, v))])
        await w.write([message("dev-b", ("v", ts[0], 0.1), ("v2", ts[0], 0.2))])
        await w.write([message("dev-b", ("v", ts[1], 0.2))])
        await settle(db)
        sums = {
            (r["device_id"], r["metric"]): r["sum"]
            for r in await db.fetch("SELECT device_id, metric, sum FROM readings_1m")
        }

    assert sums[("dev-a", "v")] == MAX  # saturated: the later -1e308 cannot bring it back
    assert sums[("dev-b", "v")] == 0.1 + 0.2  # a double sum, exactly as before
    assert sums[("dev-b", "v2")] == 0.2


async def test_a_batch_that_cannot_be_folded_is_set_aside_and_the_rest_folds(
    database_url: str,
) -> None:
    async with database(database_url) as db, writer(database_url) as w:
        # Stands for anything in the data that makes the fold fail.
        await db.execute(
            "ALTER TABLE latest_readings ADD CONSTRAINT no_poison CHECK (device_id <> 'poison')"
        )
        for i in range(9):
            device = "poison" if i in (3, 7) else f"dev-{i}"
            await w.write([message(device, ("v", NOW + timedelta(seconds=i), float(i)))])
        batches = [r["batch"] for r in await db.fetch("SELECT batch FROM dashboard_pending")]
        result = await fold(db)
        failed = await db.fetch("SELECT batch, error FROM dashboard_failed ORDER BY batch")
        devices = {r["device_id"] for r in await db.fetch("SELECT device_id FROM latest_readings")}
        pending = await db.fetchval("SELECT count(*) FROM dashboard_pending")
        # Once the cause is gone, the batches set aside fold as documented.
        await db.execute("ALTER TABLE latest_readings DROP CONSTRAINT no_poison")
        await db.execute(
            "WITH b AS (DELETE FROM dashboard_failed RETURNING batch, stored_at, min_ts, max_ts)"
            " INSERT INTO dashboard_pending SELECT * FROM b"
        )
        again = await fold(db)
        total = await db.fetchval("SELECT sum(n) FROM readings_1m")

    assert (result.batches, result.rows, result.set_aside) == (7, 7, 2)
    assert result.error is not None and "no_poison" in result.error and "23514" in result.error
    assert [r["batch"] for r in failed] == [batches[3], batches[7]]
    assert all("no_poison" in r["error"] for r in failed)
    assert devices == {f"dev-{i}" for i in range(9) if i not in (3, 7)}
    assert pending == 0
    assert (again.batches, again.set_aside, total) == (2, 0, 9)


async def test_an_error_that_is_not_the_data_sets_nothing_aside(database_url: str) -> None:
    async with database(database_url) as db, writer(database_url) as w:
        await w.write([message("dev-1", ("v", NOW, 1.0))])
        await w.write([message("dev-2", ("v", NOW, 2.0))])
        await db.execute("ALTER TABLE latest_readings RENAME TO latest_away")
        with pytest.raises(asyncpg.UndefinedTableError):
            await fold(db)
        await db.execute("ALTER TABLE latest_away RENAME TO latest_readings")
        state = await db.fetchrow(
            "SELECT (SELECT count(*) FROM dashboard_pending) AS pending,"
            " (SELECT count(*) FROM dashboard_failed) AS failed"
        )
        result = await fold(db)

    assert state is not None and tuple(state) == (2, 0)
    assert (result.batches, result.set_aside) == (2, 0)


async def test_the_folder_counts_logs_and_recovers(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.folder")
    settings = Settings(database_url=database_url, dashboard_interval=0.05)
    async with database(database_url) as db, writer(database_url) as w:
        await db.execute("ALTER TABLE devices ADD CONSTRAINT no_poison CHECK (device_id <> 'x')")
        await w.write([message("x", ("v", NOW, 1.0))])
        await w.write([message("dev-1", ("v", NOW, 1.0))])
        await db.execute("ALTER TABLE readings_1m RENAME TO readings_1m_away")
        folder = Folder(database_url, settings, log, retry_interval=0.1)
        with caplog.at_level(logging.INFO, logger="test.folder"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(folder.run)
                await until(lambda: folder.statistics().fold_failures >= 3)
                failing = folder.statistics()
                await db.execute("ALTER TABLE readings_1m_away RENAME TO readings_1m")
                await until(lambda: folder.statistics().failing_since is None)
                tg.cancel_scope.cancel()
        done = folder.statistics()
        latest = await db.fetchval("SELECT count(*) FROM latest_readings")

    assert failing.failing_since is not None and failing.folds == 0
    assert failing.pending_batches == 0  # not counted yet: no fold succeeded
    assert failing.last_error is not None and "readings_1m" in failing.last_error
    assert "42P01" in failing.last_error
    failures = [r for r in caplog.records if "dashboard fold failed" in r.getMessage()]
    assert failures and failures[0].levelno == logging.WARNING
    assert "1 in a row" in failures[0].getMessage()
    assert done.folds >= 1 and done.set_aside == 1 and done.pending_batches == 0
    assert done.fold_failures >= 3
    assert any("set aside 1 batch" in r.getMessage() for r in caplog.records)
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert latest == 1
