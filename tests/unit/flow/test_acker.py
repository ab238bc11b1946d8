from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
import pytest

from ingest.flow.acker import Acker, Delivery
from ingest.model import Decoded, Envelope


class Session:
    def __init__(self, alive: bool = True) -> None:
        self.acked: list[int] = []
        self.alive = alive
        self.calls = 0

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> int:
        self.calls += 1
        if not self.alive:
            return 0
        self.acked.extend(mid for mid, qos in acks if qos)
        return sum(1 for _, qos in acks if qos)


def deliveries(session: Session, mids: range) -> list[Delivery]:
    env = Envelope("t", b"{}", datetime.now(UTC), Decoded([], 0))
    return [Delivery(env, session, mid, 1) for mid in mids]


def test_release_in_order_even_when_committed_out_of_order() -> None:
    s = Session()
    acker = Acker()
    b0, b1, b2 = deliveries(s, range(0, 3)), deliveries(s, range(3, 5)), deliveries(s, range(5, 6))
    for _ in range(6):
        acker.received(2)  # len(b"{}")
    assert acker.release(1, b1) == 0  # held: batch 0 not committed yet
    assert s.acked == []
    assert acker.release(2, b2) == 0
    assert acker.release(0, b0) == 6
    assert s.acked == [0, 1, 2, 3, 4, 5]
    assert acker.outstanding == 0
    assert acker.statistics().acknowledged == 6


def test_dead_connection_counts_lost_not_acked() -> None:
    dead, alive = Session(alive=False), Session()
    acker = Acker()
    for _ in range(3):
        acker.received(2)  # len(b"{}")
    acker.release(0, deliveries(dead, range(2)))
    acker.release(1, deliveries(alive, range(7, 8)))
    st = acker.statistics()
    assert (st.acknowledged, st.lost_connection, st.outstanding) == (1, 2, 0)
    assert alive.acked == [7]


def test_qos0_not_counted_as_lost() -> None:
    s = Session(alive=False)
    acker = Acker()
    acker.received(2)  # len(b"{}")
    env = Envelope("t", b"{}", datetime.now(UTC), Decoded([], 0))
    acker.release(0, [Delivery(env, s, 0, 0)])
    assert acker.statistics().lost_connection == 0


def test_double_release_is_an_error() -> None:
    acker = Acker()
    acker.release(0, [])
    with pytest.raises(ValueError):
        acker.release(0, [])


def test_one_write_per_run_of_the_same_connection() -> None:
    a, b = Session(), Session()
    acker = Acker()
    batch = deliveries(a, range(3)) + deliveries(b, range(3, 5)) + deliveries(a, range(5, 6))
    for _ in batch:
        acker.received(2)  # len(b"{}")
    acker.release(0, batch)
    assert (a.calls, b.calls) == (2, 1)
    assert a.acked == [0, 1, 2, 5] and b.acked == [3, 4]


def test_qos2_acknowledged_and_lost_like_qos1() -> None:
    env = Envelope("t", b"{}", datetime.now(UTC), Decoded([], 0))
    alive, dead = Session(), Session(alive=False)
    acker = Acker()
    for _ in range(4):
        acker.received(2)  # len(b"{}")
    acker.release(0, [Delivery(env, alive, 1, 2), Delivery(env, alive, 2, 1)])
    acker.release(1, [Delivery(env, dead, 3, 2), Delivery(env, dead, 4, 1)])
    st = acker.statistics()
    assert (st.acknowledged, st.lost_connection, st.outstanding) == (2, 2, 0)
    assert alive.acked == [1, 2]


def sized(session: Session, mid: int, size: int) -> Delivery:
    env = Envelope("t", b"x" * size, datetime.now(UTC), Decoded([], 0))
    return Delivery(env, session, mid, 1)


def test_outstanding_bytes_follow_received_and_released() -> None:
    s = Session()
    acker = Acker()
    b0, b1 = [sized(s, 1, 100), sized(s, 2, 50)], [sized(s, 3, 7)]
    for d in (*b0, *b1):
        acker.received(len(d.envelope.payload))
    assert acker.statistics().outstanding_bytes == 157
    acker.release(1, b1)  # held behind batch 0: its bytes are still held too
    assert acker.outstanding_bytes == 157
    acker.release(0, b0)
    assert (acker.outstanding, acker.outstanding_bytes) == (0, 0)


def test_bytes_of_a_lost_connection_are_released_too() -> None:
    acker = Acker()
    batch = [sized(Session(alive=False), 1, 1000)]
    acker.received(1000)
    acker.release(0, batch)
    assert acker.statistics().lost_connection == 1
    assert acker.outstanding_bytes == 0


@pytest.mark.anyio
async def test_wait_returns_only_once_a_release_brings_bytes_under_the_bound() -> None:
    s = Session()
    acker = Acker()
    batches = [[sized(s, i, 400)] for i in range(3)]
    for _ in batches:
        acker.received(400)
    woken: list[int] = []

    async def waiter() -> None:
        await acker.wait_bytes_at_most(500)
        woken.append(acker.outstanding_bytes)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        acker.release(0, batches[0])  # 800 left: still over
        await anyio.wait_all_tasks_blocked()
        assert woken == []
        acker.release(1, batches[1])  # 400 left: under
    assert woken == [400]


@pytest.mark.anyio
async def test_wait_returns_at_once_when_already_under() -> None:
    acker = Acker()
    acker.received(10)
    with anyio.fail_after(5):
        await acker.wait_bytes_at_most(10)
