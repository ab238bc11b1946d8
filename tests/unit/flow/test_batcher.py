from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
import pytest
from anyio.streams.memory import MemoryObjectSendStream

from ingest.errors import DecodeError
from ingest.flow.acker import Delivery
from ingest.flow.batcher import Batcher, rows_of
from ingest.model import Decoded, Envelope, Reading

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class NoAck:
    def ack_many(self, acks: Sequence[tuple[int, int]]) -> int:
        return len(acks)


def delivery(mid: int, rows: int = 5) -> Delivery:
    readings = [Reading("d", f"m{i}", NOW, 1.0) for i in range(rows)]
    return Delivery(Envelope("t", b"{}", NOW, Decoded(readings, 0)), NoAck(), mid, 1)


def dead(mid: int) -> Delivery:
    return Delivery(Envelope("t", b"x", NOW, DecodeError("not_json", "x")), NoAck(), mid, 1)


def make(
    capacity: int = 1000,
    *,
    max_rows: int = 100,
    max_delay: float = 0.05,
    window: int = 1000,
    concurrency: int = 1,
) -> tuple[MemoryObjectSendStream[Delivery], Batcher, list[int]]:
    send, receive = anyio.create_memory_object_stream[Delivery](capacity)
    outstanding = [0]
    batcher = Batcher(
        receive, max_rows=max_rows, max_delay=max_delay, window=window,
        outstanding=lambda: outstanding[0], concurrency=concurrency,
    )  # fmt: skip
    return send, batcher, outstanding


def test_rows_of() -> None:
    assert rows_of(delivery(1, rows=7)) == 7
    assert rows_of(dead(1)) == 1


async def test_cut_by_rows() -> None:
    send, batcher, outstanding = make(max_rows=20)
    for i in range(10):
        send.send_nowait(delivery(i))
    outstanding[0] = 10
    batch = await batcher.next_batch()
    assert batch is not None and [d.mid for d in batch] == [0, 1, 2, 3]  # 4 x 5 rows = 20
    assert batcher.statistics().cut_by_rows == 1


async def test_cut_by_delay_when_input_stays_empty() -> None:
    send, batcher, outstanding = make(max_delay=0.05)
    send.send_nowait(delivery(1))
    outstanding[0] = 1
    t0 = anyio.current_time()
    batch = await batcher.next_batch()
    waited = anyio.current_time() - t0
    assert batch is not None and len(batch) == 1
    assert waited >= 0.04
    assert batcher.statistics().cut_by_delay == 1


async def test_a_batch_takes_its_share_of_the_window_when_writes_overlap() -> None:
    # Two batches may be written at once: each takes half the window, so the second one can
    # fill while the first commits; the rest waits for the next batch.
    send, batcher, outstanding = make(max_rows=10_000, max_delay=30.0, window=10, concurrency=2)
    for i in range(12):
        send.send_nowait(delivery(i))
    outstanding[0] = 12
    with anyio.fail_after(1):
        first = await batcher.next_batch()
        second = await batcher.next_batch()
    assert first is not None and [d.mid for d in first] == [0, 1, 2, 3, 4]
    assert second is not None and [d.mid for d in second] == [5, 6, 7, 8, 9]
    assert batcher.statistics().cut_by_window == 2


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        make(concurrency=0)


async def test_cut_at_window_without_waiting_for_the_timer() -> None:
    # Every message the broker allows in flight is in hand: waiting cannot bring more.
    send, batcher, outstanding = make(max_delay=30.0, window=3)
    for i in range(3):
        send.send_nowait(delivery(i))
    outstanding[0] = 3
    with anyio.fail_after(1):
        batch = await batcher.next_batch()
    assert batch is not None and len(batch) == 3
    assert batcher.statistics().cut_by_window == 1


async def test_messages_arriving_during_the_wait_join_the_batch() -> None:
    send, batcher, outstanding = make(max_delay=0.2)
    send.send_nowait(delivery(0))
    outstanding[0] = 1

    async def later() -> None:
        await anyio.sleep(0.02)
        outstanding[0] = 2
        await send.send(delivery(1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        batch = await batcher.next_batch()
    assert batch is not None and [d.mid for d in batch] == [0, 1]


async def test_end_of_stream_flushes_then_returns_none() -> None:
    send, batcher, outstanding = make(max_delay=30.0)
    send.send_nowait(delivery(0))
    send.send_nowait(dead(1))
    outstanding[0] = 2
    await send.aclose()
    with anyio.fail_after(1):
        batch = await batcher.next_batch()
        assert batch is not None and [d.mid for d in batch] == [0, 1]
        assert await batcher.next_batch() is None
        assert await batcher.next_batch() is None


async def test_small_broker_window_is_detected_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    send, batcher, outstanding = make(max_delay=0.01, window=1000)
    caplog.set_level(logging.WARNING)
    for round_ in range(4):
        # Under load (a message already waits), the broker stops at 20 unacked each time.
        for i in range(20):
            send.send_nowait(delivery(round_ * 20 + i, rows=1))
        outstanding[0] = 20
        batch = await batcher.next_batch()
        assert batch is not None and len(batch) == 20
        outstanding[0] = 0
    assert batcher.window == 20
    assert "only 20 unacknowledged" in caplog.text
    # Now the batcher cuts at 20 without waiting for the timer.
    for i in range(20):
        send.send_nowait(delivery(100 + i, rows=1))
    outstanding[0] = 20
    before = batcher.statistics().cut_by_window
    await batcher.next_batch()
    assert batcher.statistics().cut_by_window == before + 1


async def test_light_load_does_not_shrink_the_window() -> None:
    send, batcher, outstanding = make(max_delay=0.01, window=1000)
    for i in range(5):
        # Idle pipeline: the batcher is already waiting when the message arrives.
        async def put(mid: int = i) -> None:
            await anyio.sleep(0.005)
            outstanding[0] = 1
            await send.send(delivery(mid))

        async with anyio.create_task_group() as tg:
            tg.start_soon(put)
            await batcher.next_batch()
        outstanding[0] = 0
    assert batcher.window == 1000
