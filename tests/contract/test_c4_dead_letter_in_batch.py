"""C4 dead-letter-in-batch: a bad message becomes one dead letter, in the same transaction as
the rest of its batch, and is acknowledged in its place (docs/contract.md, C4). Against a real
PostgreSQL."""

from __future__ import annotations

import pytest

from tests.contract.database import fetch, migrated_writer, storage_of_readings
from tests.contract.harness import (
    ack_bytes,
    bad_delivery,
    delivery,
    pipeline,
    run_to_end,
    unconnected_session,
    wire,
)

pytestmark = pytest.mark.anyio


async def test_C4_bad_message_is_one_dead_letter_in_its_batch_and_acknowledged(
    database_url: str,
) -> None:
    async with await migrated_writer(database_url) as writer:
        session = unconnected_session()
        items = [delivery(session, 1), bad_delivery(session, 2), delivery(session, 3)]
        p = pipeline(items, writer)
        await run_to_end(p)
        st = p.statistics()
        assert (st.rows_inserted, st.dead_letters, st.batches) == (4, 1, 1)
        assert st.dead_reasons == {"not_json": 1}
        # Acknowledged in its place, between its neighbours.
        assert wire(session) == ack_bytes(items)
    dead = await fetch(database_url, "SELECT reason, payload, xmin::text AS tx FROM dead_letters")
    assert [(r["reason"], bytes(r["payload"])) for r in dead] == [("not_json", b"{not json")]
    storage = await storage_of_readings(database_url)
    # Every row of the batch, dead letter included, was written by one transaction.
    txs = await fetch(database_url, f"SELECT DISTINCT xmin::text AS tx FROM {storage}")
    assert [r["tx"] for r in txs] == [dead[0]["tx"]]
