"""C2 receive-order: acknowledgements leave in receive order, even when batches commit out of
order, QoS 2 included (docs/contract.md, C2)."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from tests.contract.harness import (
    HandWriter,
    ack_bytes,
    delivery,
    pipeline,
    puback,
    pubcomp,
    unconnected_session,
    wire,
)

pytestmark = pytest.mark.anyio


async def test_C2_batches_committing_3_1_2_acknowledge_in_receive_order() -> None:
    session = unconnected_session()
    qos = [1, 2, 1, 1, 2, 1]
    items = [delivery(session, mid, qos=q) for mid, q in enumerate(qos, start=1)]
    writer = HandWriter()
    p = pipeline(items, writer, concurrency=3)  # three batches of two, written at once
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            first, second, third = await writer.wait_calls(3)
            assert [len(c.envelopes) for c in (first, second, third)] == [2, 2, 2]

            third.commit()
            await wait_all_tasks_blocked()
            assert wire(session) == b""  # held: batches 1 and 2 have not committed

            first.commit()
            await wait_all_tasks_blocked()
            assert wire(session) == ack_bytes(items[:2])  # batch 1 only: 2 still holds 3

            p.stop_reading()
            second.commit()
    assert wire(session) == ack_bytes(items)
    assert wire(session) == (
        puback(1) + pubcomp(2) + puback(3) + puback(4) + pubcomp(5) + puback(6)
    )
    assert p.acker.statistics().held_batches == 0


async def test_C2_ack_many_writes_qos2_in_its_place() -> None:
    # One run of acknowledgements mixing QoS 1 and 2 leaves as one write, in the order given:
    # the PUBCOMP of a QoS 2 message never overtakes the PUBACKs of earlier messages.
    session = unconnected_session()
    assert session.ack_many([(1, 1), (2, 2), (3, 1), (300, 1), (65535, 2)]) == 5
    assert wire(session) == (puback(1) + pubcomp(2) + puback(3) + puback(300) + pubcomp(65535))


async def test_C2_ack_many_skips_qos0() -> None:
    session = unconnected_session()
    assert session.ack_many([(0, 0), (7, 1), (0, 0)]) == 1
    assert wire(session) == puback(7)
