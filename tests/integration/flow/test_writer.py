"""The writer against a real PostgreSQL: exact rows, dead letters, duplicates, poison rows,
fatal and transient errors (including a blackholed connection through a small TCP proxy)."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ingest.db.migrate import migrate_dsn
from ingest.errors import DecodeError, FatalError
from ingest.flow.classify import ErrorClass, classify
from ingest.flow.writer import Writer
from ingest.model import Decoded, Envelope, Reading

pytestmark = pytest.mark.anyio

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
RECEIVED = datetime(2024, 5, 1, 12, 0, 5, 250_000, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def message(device: str, *readings: tuple[str, datetime, float]) -> Envelope:
    rows = [Reading(device, metric, ts, value) for metric, ts, value in readings]
    payload = repr(readings).encode()
    return Envelope(f"devices/{device}/telemetry", payload, RECEIVED, Decoded(rows, 0))


def malformed(device: str, payload: bytes, reason: str = "not_json") -> Envelope:
    return Envelope(
        f"devices/{device}/telemetry", payload, RECEIVED, DecodeError(reason, f"bad: {reason}")
    )


def fleet(messages: int, per_message: int = 2, start: int = 0) -> list[Envelope]:
    return [
        message(
            f"dev-{i:05d}",
            *(
                (f"m{k}", T0 + timedelta(milliseconds=i), float(i * 10 + k))
                for k in range(per_message)
            ),
        )
        for i in range(start, start + messages)
    ]


def quick_writer(dsn: str, **overrides: float | str) -> Writer:
    settings: dict[str, float | str] = {
        "connect_timeout": 2.0,
        "write_timeout": 5.0,
        "backoff_initial": 0.02,
        "backoff_max": 0.1,
    }
    settings.update(overrides)
    return Writer(dsn=dsn, **settings)  # type: ignore[arg-type]


async def connect(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    return await asyncpg.connect(dsn)


@asynccontextmanager
async def database(dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    await migrate_dsn(dsn)
    conn = await connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_readings_land_exactly(database_url: str) -> None:
    paris = timezone(timedelta(hours=2))
    batch = [
        message(
            "dev-1",
            ("temperature", T0, 21.5),
            ("env.humidity", T0, 0.1),
            ("tiny", T0, 5e-324),
        ),
        message(
            "dev-2",
            ("temperature", datetime(2024, 5, 1, 14, 0, 0, 123_456, tzinfo=paris), -40.0),
            ("huge", T0, 1.7976931348623157e308),
        ),
        message(  # before PostgreSQL's epoch (negative microseconds), names beyond ASCII
            "capteur-é",
            ("température", datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), 1.0),
            ("温度", datetime(1970, 1, 1, tzinfo=UTC), 0.0),
        ),
    ]
    async with database(database_url) as db, quick_writer(database_url) as writer:
        result = await writer.write(batch)
        assert (result.inserted, result.duplicates, result.dead_letters) == (7, 0, 0)
        assert result.retries == 0
        rows = await db.fetch("SELECT device_id, metric, ts, value FROM readings")
        stats = writer.statistics()

    got = {(r["device_id"], r["metric"]): (r["ts"], r["value"]) for r in rows}
    want = {(r.device_id, r.metric): (r.ts, r.value) for e in batch for r in e.result.readings}  # type: ignore[union-attr]
    assert got == want
    assert all(ts.tzinfo is not None and ts.utcoffset() == timedelta(0) for ts, _ in got.values())
    assert got[("dev-2", "temperature")][0] == datetime(2024, 5, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    assert stats.batches == 1 and stats.rows_inserted == 7 and stats.connected
    assert stats.last_commit is not None


async def test_dead_letters_land_in_the_same_transaction(database_url: str) -> None:
    raw = b"\xff\xfe not json \x00"
    batch = [
        message("dev-1", ("t", T0, 1.0)),
        malformed("dev-2", raw),
        message("dev-3", ("t", T0, 3.0)),
    ]
    async with database(database_url) as db, quick_writer(database_url) as writer:
        result = await writer.write(batch)
        dead = await db.fetch(
            "SELECT received_at, topic, payload, error, reason, xmin FROM dead_letters"
        )
        xmins = {r["xmin"] for r in await db.fetch("SELECT xmin FROM points")}

    assert (result.inserted, result.dead_letters, result.dead_reasons) == (2, 1, {"not_json": 1})
    assert len(dead) == 1
    row = dead[0]
    assert (row["topic"], bytes(row["payload"]), row["error"], row["reason"]) == (
        "devices/dev-2/telemetry",
        raw,
        "bad: not_json",
        "not_json",
    )
    assert row["received_at"] == RECEIVED
    assert xmins == {row["xmin"]}, "readings and dead letters were committed separately"


async def test_too_large_keeps_its_start_and_records_its_size(database_url: str) -> None:
    # The source keeps the first 64 KiB of an oversized payload; the size on the wire is
    # recorded beside it, and a whole payload records no size (NULL: the payload is all of it).
    start = bytes(range(256)) * 256
    oversized = Envelope(
        "devices/dev-2/telemetry",
        start,
        RECEIVED,
        DecodeError("too_large", "payload of 100000000 bytes is over the limit"),
        100_000_000,
    )
    batch = [message("dev-1", ("t", T0, 1.0)), oversized, malformed("dev-3", b"{")]
    async with database(database_url) as db, quick_writer(database_url) as writer:
        result = await writer.write(batch)
        dead = await db.fetch("SELECT topic, payload, reason, payload_size FROM dead_letters")

    assert (result.inserted, result.dead_reasons) == (1, {"too_large": 1, "not_json": 1})
    got = {r["reason"]: (bytes(r["payload"]), r["payload_size"]) for r in dead}
    assert got == {"too_large": (start, 100_000_000), "not_json": (b"{", None)}
    assert len(start) == 65536


async def test_duplicates_collapse_and_are_counted(database_url: str) -> None:
    first = fleet(10)
    async with database(database_url) as db, quick_writer(database_url) as writer:
        one = await writer.write(first)
        # Redelivery of 5 messages, 3 new ones, one of them twice in the same batch, and a
        # later value for an existing key (the first write wins).
        changed = message("dev-00000", ("m0", T0, 999.0))
        fresh = fleet(3, start=100)
        two = await writer.write([*first[:5], *fresh, fresh[0], changed])
        three = await writer.write(fleet(2, start=200))  # the fast path again, no leftovers
        count = await db.fetchval("SELECT count(*) FROM readings")
        kept = await db.fetchval(
            "SELECT value FROM readings WHERE device_id = 'dev-00000' AND metric = 'm0'"
        )
        stats = writer.statistics()

    assert (one.inserted, one.duplicates) == (20, 0)
    assert (two.inserted, two.duplicates) == (6, 10 + 2 + 1)
    assert (three.inserted, three.duplicates) == (4, 0)
    assert count == 30
    assert kept == 0.0
    assert (stats.batches, stats.rows_inserted, stats.duplicates) == (3, 30, 13)


async def test_poison_rows_become_dead_letters_and_neighbours_commit(database_url: str) -> None:
    batch = fleet(40)
    batch[7] = message("dev-00007", ("m0", T0, 1.0), ("m1", T0, 5e6))  # CHECK rejects 5e6
    batch[21] = message("dev-00021", ("\ud800", T0, 1.0))  # asyncpg cannot encode it
    batch[30] = malformed("dev-00030", b"{")
    async with database(database_url) as db:
        await db.execute("ALTER TABLE points ADD CONSTRAINT v CHECK (value < 1e6)")
        async with quick_writer(database_url) as writer:
            result = await writer.write(batch)
            # The next batch is not held back by the previous one.
            after = await writer.write(fleet(5, start=1000))
        count = await db.fetchval("SELECT count(*) FROM readings")
        kept = await db.fetchval("SELECT count(*) FROM readings WHERE device_id = 'dev-00007'")
        dead = await db.fetch("SELECT topic, payload, error, reason FROM dead_letters ORDER BY id")

    assert result.inserted == 37 * 2 and result.duplicates == 0
    assert result.dead_reasons == {"rejected_by_database": 2, "not_json": 1}
    assert count == 37 * 2 + 10
    assert kept == 0, "a message is stored whole or not at all"
    assert after.inserted == 10 and after.retries == 0
    by_topic = {r["topic"]: r for r in dead}
    check = by_topic["devices/dev-00007/telemetry"]
    assert check["reason"] == "rejected_by_database"
    assert 'violates check constraint "v"' in check["error"]
    assert bytes(check["payload"]) == batch[7].payload
    surrogate = by_topic["devices/dev-00021/telemetry"]
    assert surrogate["reason"] == "rejected_by_database"
    assert "UnicodeEncodeError" in surrogate["error"]
    assert by_topic["devices/dev-00030/telemetry"]["reason"] == "not_json"
    # Bisection: two bad messages among 40 cost a handful of transactions, not 40.
    assert result.retries <= 4 * math.ceil(math.log2(40))


async def test_fatal_error_raises_and_does_not_retry(database_url: str) -> None:
    async with database(database_url) as db:
        await db.execute("ALTER TABLE points RENAME TO points_old")
        async with quick_writer(database_url) as writer:
            with pytest.raises(FatalError, match="42P01") as caught:
                async with asyncio.timeout(5):
                    await writer.write(fleet(3))
            assert writer.statistics().retries_by_class == {}
    assert isinstance(caught.value.__cause__, asyncpg.UndefinedTableError)


async def test_fatal_error_at_start(database_url: str) -> None:
    missing = urlunsplit(urlsplit(database_url)._replace(path="/no_such_database_here"))
    with pytest.raises(FatalError, match="3D000"):
        async with asyncio.timeout(5), quick_writer(missing):
            pass


async def test_connection_terminated_mid_write_is_retried_exactly_once(database_url: str) -> None:
    name = "ingest-test-terminate"
    async with (
        database(database_url) as db,
        quick_writer(database_url, application_name=name) as writer,
    ):
        await writer.write(fleet(1, start=999))  # warm the pool connection
        # Hold the write in the middle of its transaction, then kill its backend.
        await db.execute("BEGIN; LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(writer.write(fleet(50)))
        for _ in range(250):
            if await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND wait_event_type = 'Lock'",
                name,
            ):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the write never reached the lock")
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1",
            name,
        )
        await db.execute("ROLLBACK")
        async with asyncio.timeout(10):
            result = await task
        count = await db.fetchval("SELECT count(*) FROM readings")
        stats = writer.statistics()

    assert killed >= 1
    assert result.retries >= 1 and stats.retries_by_class.get("transient", 0) >= 1
    assert result.inserted + result.duplicates == 100
    assert count == 100 + 2


async def test_a_connection_dropped_while_checked_out_is_transient(database_url: str) -> None:
    """asyncpg hands a connection the server dropped back to its pool at once, and the proxy
    still held refuses every later call with an InterfaceError: the writer met it when
    PostgreSQL restarted between two of its statements, and stopped as on a fatal error."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with database(database_url) as db:
            conn = await pool.acquire()
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn: lost.set())
            assert await db.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            async with asyncio.timeout(10):
                await lost.wait()
            with pytest.raises(asyncpg.InterfaceError, match="released back to the pool") as caught:
                conn.transaction()
        assert classify(caught.value) is ErrorClass.TRANSIENT
    finally:
        pool.terminate()


async def test_start_waits_while_the_server_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logger = logging.getLogger("test.writer.unreachable")
    writer = Writer(
        dsn=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        connect_timeout=0.5,
        backoff_initial=0.02,
        backoff_max=0.1,
        logger=logger,
    )
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        task = asyncio.create_task(writer.__aenter__())
        await asyncio.sleep(1.0)
        assert not task.done()
        retries = writer.statistics().retries_by_class.get("transient", 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert retries >= 5
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, "one line per outage, not one per attempt"
    assert "connecting to the database failed" in warnings[0].getMessage()
    assert not writer.statistics().connected


class BlackholeProxy:
    """A TCP forwarder that can swallow traffic without resetting anything: what a pulled cable
    or a dropping firewall looks like to the writer."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()
        self.blackholed = False
        self.port = 0

    async def __aenter__(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._drop_all()
        await self._server.wait_closed()

    def heal(self) -> None:
        # The connections that lived through the outage carry a torn protocol stream.
        self.blackholed = False
        self._drop_all()

    def _drop_all(self) -> None:
        for stream in self._streams:
            stream.transport.abort()
        self._streams.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._streams.add(writer)
        if self.blackholed:
            await self._pump(reader, None)
            return
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._streams.add(up_writer)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None) -> None:
        with suppress(OSError):
            while data := await source.read(65536):
                if sink is None or self.blackholed:
                    continue
                sink.write(data)
                await sink.drain()
        if sink is not None:
            sink.transport.abort()


async def test_blackholed_database_is_noticed_by_the_write_timeout(database_url: str) -> None:
    parts = urlsplit(database_url)
    assert parts.hostname is not None and parts.port is not None
    async with database(database_url) as db, BlackholeProxy(parts.hostname, parts.port) as proxy:
        via_proxy = urlunsplit(parts._replace(netloc=f"postgres@127.0.0.1:{proxy.port}"))
        async with quick_writer(via_proxy, write_timeout=0.4, connect_timeout=0.4) as writer:
            await writer.write(fleet(5))
            proxy.blackholed = True
            task = asyncio.create_task(writer.write(fleet(20, start=100)))
            await asyncio.sleep(1.2)
            assert not task.done(), "the write must wait while the database is unreachable"
            assert writer.statistics().retries_by_class.get("transient", 0) >= 1
            proxy.heal()
            async with asyncio.timeout(10):
                result = await task
            stats = writer.statistics()
        count = await db.fetchval("SELECT count(*) FROM readings")
        dead = await db.fetchval("SELECT count(*) FROM dead_letters")
    assert stats.connected
    assert result.inserted + result.duplicates == 40
    assert count == 10 + 40
    # Every write timed out, but so did the probe after it: the database was away, and that is
    # no message's fault. Retried whole, never split, nothing dead-lettered.
    assert (result.dead_letters, dead) == (0, 0)
    assert stats.retries_by_class.get("row", 0) == 0


async def test_ping_and_close(database_url: str) -> None:
    await migrate_dsn(database_url)
    writer = quick_writer(database_url)
    async with writer:
        await writer.ping()
        assert writer.statistics().connected
    assert not writer.statistics().connected
    with pytest.raises(RuntimeError, match="not open"):
        await writer.write(fleet(1))
