"""The daemon's row of the sessions table: upserted at each connect, refreshed while connected,
marked at a clean disconnect, a retired client id used again starts anew."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import asyncpg

from ingest.db.sessions import Recorder
from tests.integration.support import migrate


async def scenario(database_url: str) -> dict[str, Any]:
    status = {"connects": 0, "subscribed": False}
    recorder = Recorder(
        database_url,
        client_id="ingest-a-3",
        broker="mqtt://127.0.0.1:1883",
        share_group="ingest-a",
        status=lambda: (int(status["connects"]), bool(status["subscribed"])),
        log=logging.getLogger("test"),
        refresh_interval=1.0,
    )
    conn = await asyncpg.connect(database_url)

    async def row() -> dict[str, Any]:
        rows = await conn.fetch("SELECT * FROM sessions")
        assert len(rows) <= 1
        return dict(rows[0]) if rows else {}

    seen: dict[str, Any] = {}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run)
            await anyio.sleep(1.5)
            seen["before"] = await row()  # not connected yet: nothing recorded
            status.update(connects=1, subscribed=True)
            await anyio.sleep(1.5)
            seen["first"] = await row()
            await anyio.sleep(2.5)
            seen["refreshed"] = await row()
            tg.cancel_scope.cancel()
        await recorder.left()
        seen["left"] = await row()
        # Retired, then the same client id connects again (a worker set grew back).
        await conn.execute("UPDATE sessions SET retired_at = now()")
        status.update(connects=2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(recorder.run)
            await anyio.sleep(1.5)
            tg.cancel_scope.cancel()
        seen["again"] = await row()
    finally:
        await conn.close()
    seen["failures"] = recorder.failures
    return seen


def test_recorder_upserts_refreshes_and_marks_a_clean_disconnect(database_url: str) -> None:
    migrate(database_url)
    seen = anyio.run(scenario, database_url)
    first, refreshed, left, again = (seen[k] for k in ("first", "refreshed", "left", "again"))
    assert seen["before"] == {}
    assert first["broker"] == "mqtt://127.0.0.1:1883" and first["share_group"] == "ingest-a"
    assert first["first_seen"] == first["last_seen"] and first["retired_at"] is None
    assert refreshed["last_seen"] > first["last_seen"]
    assert refreshed["first_seen"] == first["first_seen"]
    assert left["disconnected_at"] is not None
    assert again["retired_at"] is None and again["disconnected_at"] is None
    assert again["first_seen"] > first["first_seen"]
    assert seen["failures"] == 0


def test_a_daemon_stopped_within_a_second_of_connecting_is_recorded_at_its_drain(
    database_url: str,
) -> None:
    """The recorder looks at the source once a second; a clean drain records a connect it
    has not seen yet, so even that session can be found and retired."""
    migrate(database_url)

    async def go() -> dict[str, Any]:
        recorder = Recorder(
            database_url,
            client_id="ingest-b-0",
            broker="mqtt://127.0.0.1:1883",
            share_group="ingest-b",
            status=lambda: (1, False),
            log=logging.getLogger("test"),
        )
        await recorder.left()
        conn = await asyncpg.connect(database_url)
        try:
            row = await conn.fetchrow("SELECT * FROM sessions")
            assert row is not None
            return dict(row)
        finally:
            await conn.close()

    row = anyio.run(go)
    assert row["client_id"] == "ingest-b-0" and row["disconnected_at"] is not None
