"""Stage 6, the acker: PUBACKs go out only after commit, in the order messages arrived.

Batches are numbered in receive order. A batch whose transaction committed is released only
once every earlier batch has been released too, so acknowledgements leave in receive order even
if batches were ever committed out of order (some brokers disconnect a client that acks out of
order). Messages of a connection that has since closed cannot be acknowledged any more: the
broker redelivers them on the next connection and the idempotent write absorbs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ingest.model import AckStatistics, Envelope

__all__ = ["Acker", "Acknowledger", "Delivery"]


class Acknowledger(Protocol):
    def ack_many(self, acks: Sequence[tuple[int, int]]) -> int:
        """Acknowledge ``(mid, qos)`` pairs in order; returns how many went out (0 when the
        connection is gone)."""
        ...


class Delivery(NamedTuple):
    """A decoded message plus what it takes to acknowledge it."""

    envelope: Envelope
    session: Acknowledger
    mid: int
    qos: int


class Acker:
    def __init__(self) -> None:
        self.outstanding = 0  # received and handed on, not yet acknowledged (or given up)
        self.acknowledged = 0
        self.lost_connection = 0
        self._next_seq = 0
        self._held: dict[int, Sequence[Delivery]] = {}

    def received(self) -> None:
        self.outstanding += 1

    def release(self, seq: int, deliveries: Sequence[Delivery]) -> int:
        """Batch ``seq`` has committed. Acknowledge it and any held batches that now follow in
        order; returns how many messages were released now."""
        if seq < self._next_seq or seq in self._held:
            raise ValueError(f"batch {seq} released twice")
        self._held[seq] = deliveries
        released = 0
        while self._next_seq in self._held:
            batch = self._held.pop(self._next_seq)
            self._next_seq += 1
            # Consecutive messages of one connection go out as one write, in order.
            start = 0
            while start < len(batch):
                session = batch[start].session
                end = start + 1
                while end < len(batch) and batch[end].session is session:
                    end += 1
                run = batch[start:end]
                sent = session.ack_many([(d.mid, d.qos) for d in run])
                self.acknowledged += sent
                self.lost_connection += sum(1 for d in run if d.qos) - sent
                start = end
            self.outstanding -= len(batch)
            released += len(batch)
        return released

    def statistics(self) -> AckStatistics:
        return AckStatistics(
            outstanding=self.outstanding,
            acknowledged=self.acknowledged,
            lost_connection=self.lost_connection,
            held_batches=len(self._held),
        )
