"""C6 no-cross-connection-ack: messages received on a connection that was lost are never
acknowledged on the next one (docs/contract.md, C6).

Packet ids belong to a connection: the id of a message of the old connection may name another
message on the new one, and acknowledging it there would acknowledge that other message before
its commit. The broker redelivers the old messages on the new connection instead.
"""

from __future__ import annotations

import anyio
import pytest

from tests.contract.harness import (
    HandWriter,
    ack_bytes,
    delivery,
    pipeline,
    unconnected_session,
    wire,
)

pytestmark = pytest.mark.anyio


async def test_C6_ack_many_on_a_closed_session_writes_nothing() -> None:
    session = unconnected_session()
    session.closed = True  # what the source marks when the connection is lost
    assert session.ack_many([(1, 1), (2, 2)]) == 0
    assert wire(session) == b""


async def test_C6_ack_many_after_disconnect_writes_nothing() -> None:
    session = unconnected_session()
    session.client._disconnected.set_exception(ConnectionResetError("broker went away"))
    assert session.ack_many([(1, 1)]) == 0
    assert wire(session) == b""
    session.client._disconnected.exception()  # retrieved: no "never retrieved" warning


async def test_C6_batch_spanning_a_reconnect_acks_only_the_live_connection() -> None:
    old, new = unconnected_session(), unconnected_session()
    # Packet ids restart on the new connection: mid 1 and 2 exist on both.
    items = [delivery(old, 1, seq=1), delivery(old, 2, seq=2)]
    items += [delivery(new, 1, seq=3), delivery(new, 2, qos=2, seq=4)]
    writer = HandWriter()
    p = pipeline(items, writer)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            (call,) = await writer.wait_calls(1)
            old.closed = True  # the old connection is lost while the batch commits
            p.stop_reading()
            call.commit()
    assert wire(old) == b""
    assert wire(new) == ack_bytes(items[2:])
    st = p.acker.statistics()
    assert (st.acknowledged, st.lost_connection, st.outstanding) == (2, 2, 0)
