"""C1 ack-after-commit: a message is acknowledged only after the transaction holding its rows
or its dead letter committed (docs/contract.md, C1).

The pipeline is fed real deliveries of a real (unconnected) MQTT session; the writer is held by
the test. What the session would send to the broker is read back byte for byte.
"""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from ingest.errors import FatalError
from tests.contract.harness import (
    HandWriter,
    ack_bytes,
    delivery,
    pipeline,
    unconnected_session,
    wire,
)

pytestmark = pytest.mark.anyio


async def test_C1_no_puback_while_writer_blocks() -> None:
    session = unconnected_session()
    items = [delivery(session, mid) for mid in range(1, 6)]
    writer = HandWriter()
    p = pipeline(items, writer)
    with anyio.fail_after(30):  # a guard against a hang, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            (call,) = await writer.wait_calls(1)
            await wait_all_tasks_blocked()  # everything that could run has run
            assert [e.payload for e in call.envelopes] == [d.envelope.payload for d in items]
            assert wire(session) == b""
            assert p.acker.statistics().acknowledged == 0
            # The same pipeline acknowledges as soon as the write returns: the silence above
            # was the blocked commit, not a harness that cannot see PUBACKs.
            p.stop_reading()
            call.commit()
    assert wire(session) == ack_bytes(items)
    assert p.statistics().acknowledged == 5


async def test_C1_no_puback_when_writer_raises() -> None:
    session = unconnected_session()
    items = [delivery(session, mid) for mid in range(1, 6)]
    writer = HandWriter()
    p = pipeline(items, writer)
    with anyio.fail_after(30), pytest.raises(ExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            (call,) = await writer.wait_calls(1)
            call.fail(FatalError("permission denied"))
    assert caught.group_contains(FatalError)
    assert wire(session) == b""
    assert p.acker.statistics().acknowledged == 0


async def test_C1_batch_committed_after_a_failed_one_is_not_acknowledged() -> None:
    # Two batches written at once: the second commits, then the first fails. The second's
    # PUBACKs would have to overtake the first's messages (C2), so none may leave: the broker
    # redelivers both batches and the idempotent write absorbs the second (C3).
    session = unconnected_session()
    items = [delivery(session, mid) for mid in range(1, 5)]
    writer = HandWriter()
    p = pipeline(items, writer, concurrency=2)
    with anyio.fail_after(30), pytest.raises(ExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            first, second = await writer.wait_calls(2)
            second.commit()
            await wait_all_tasks_blocked()
            assert wire(session) == b""
            first.fail(FatalError("disk on fire"))
    assert caught.group_contains(FatalError)
    assert wire(session) == b""
    assert p.acker.statistics().acknowledged == 0
