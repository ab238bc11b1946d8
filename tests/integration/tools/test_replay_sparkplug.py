"""``ingest replay`` of Sparkplug dead letters: data by alias that arrived before its birth
(``unknown_alias``) decodes once the birth is stored in ``sparkplug_births``."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from ingest.formats.decode import FORMATS
from ingest.formats.routes import parse_routes
from ingest.formats.sparkplug_schema import DataType, Payload
from ingest.tools.replay import replay
from tests.integration.support import migrate, query

T0 = 1_700_000_000_000


def at(offset_ms: int) -> datetime:
    return datetime.fromtimestamp(T0 / 1000, UTC) + timedelta(milliseconds=offset_ms)


def test_replay_decodes_unknown_alias_dead_letters_by_the_stored_births(
    database_url: str,
) -> None:
    migrate(database_url)
    birth = Payload(timestamp=T0)
    birth.metrics.add(name="rpm", alias=10, datatype=DataType.UInt32, long_value=1500)
    data = Payload(timestamp=T0 + 5)
    data.metrics.add(alias=10, long_value=1490)
    stray = Payload(timestamp=T0 + 6)
    stray.metrics.add(alias=99, long_value=1)  # still declared by no birth

    async def load() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "INSERT INTO sparkplug_births (device_id, born_at, payload) VALUES ($1, $2, $3)",
                "plant/edge1/pump", at(0), birth.SerializeToString(),
            )  # fmt: skip
            await conn.executemany(
                "INSERT INTO dead_letters (received_at, topic, payload, error, reason)"
                " VALUES (now(), $1, $2, 'x', 'unknown_alias')",
                [
                    ("spBv1.0/plant/DDATA/edge1/pump", data.SerializeToString()),
                    ("spBv1.0/plant/DDATA/edge1/pump", stray.SerializeToString()),
                ],
            )
        finally:
            await conn.close()

    asyncio.run(load())
    routes = parse_routes([{"topic": "spBv1.0/#", "format": "sparkplug"}], FORMATS)
    summary = asyncio.run(replay(database_url, routes=routes))
    assert (summary.still_failing, summary.readings_inserted) == (1, 1)
    rows = query(database_url, "SELECT device_id, metric, ts, value FROM readings")
    assert [tuple(r) for r in rows] == [("plant/edge1/pump", "rpm", at(5), 1490.0)]
    left = query(database_url, "SELECT payload FROM dead_letters")
    assert [bytes(r["payload"]) for r in left] == [stray.SerializeToString()]
