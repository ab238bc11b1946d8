"""C3 duplicates-absorbed: a redelivered or repeated reading collapses on its key and is
counted as a duplicate (docs/contract.md, C3). Against a real PostgreSQL."""

from __future__ import annotations

import pytest

from tests.contract.database import fetch, fetchval, migrated_writer
from tests.contract.harness import (
    ack_bytes,
    delivery,
    pipeline,
    run_to_end,
    unconnected_session,
    wire,
)

pytestmark = pytest.mark.anyio
ROWS_PER_MESSAGE = 2  # seq and t (harness.delivery)


async def test_C3_redelivered_batch_collapses_and_is_counted(database_url: str) -> None:
    async with await migrated_writer(database_url) as writer:
        first = unconnected_session()
        items = [delivery(first, mid) for mid in range(1, 4)]
        p = pipeline(items, writer)
        await run_to_end(p)
        assert p.statistics().rows_inserted == 3 * ROWS_PER_MESSAGE

        # The broker redelivers the same messages on a new connection (new packet ids).
        second = unconnected_session()
        again = [delivery(second, mid + 10, seq=mid) for mid in range(1, 4)]
        p = pipeline(again, writer)
        await run_to_end(p)
        st = p.statistics()
        assert (st.rows_inserted, st.duplicates) == (0, 3 * ROWS_PER_MESSAGE)
        assert wire(second) == ack_bytes(again)  # duplicates are acknowledged too
    assert await fetchval(database_url, "SELECT count(*) FROM readings") == 3 * ROWS_PER_MESSAGE


async def test_C3_repeat_inside_one_batch_first_write_wins(database_url: str) -> None:
    async with await migrated_writer(database_url) as writer:
        session = unconnected_session()
        # Same device, metrics and timestamp, another value: a device resending a sample.
        items = [
            delivery(session, 1, seq=7),
            delivery(session, 2, seq=7, t=99.0),
            delivery(session, 3, seq=8),
        ]
        p = pipeline(items, writer)
        await run_to_end(p)
        st = p.statistics()
        assert (st.rows_inserted, st.duplicates) == (2 * ROWS_PER_MESSAGE, ROWS_PER_MESSAGE)
        assert wire(session) == ack_bytes(items)
    rows = await fetch(database_url, "SELECT value FROM readings WHERE metric = 't' ORDER BY ts")
    assert [r["value"] for r in rows] == [20.5, 20.5]  # the first write of seq 7 won
