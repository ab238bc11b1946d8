"""Stage 6, the acker: PUBACKs go out only after commit, in the order messages arrived.

Batches are numbered in receive order. A batch whose transaction committed is released only
once every earlier batch has been released too, so acknowledgements leave in receive order even
if batches were ever committed out of order (some brokers disconnect a client that acks out of
order). Messages of a connection that has since closed cannot be acknowledged any more: the
broker redelivers them on the next connection and the idempotent write absorbs them.

The acker also counts the payload bytes of the messages it holds (``outstanding_bytes``): the
source stops taking messages while they are over ``INGEST_MQTT_INFLIGHT_BYTES`` and waits in
``wait_bytes_at_most`` until a release brings them under (docs/design.md, Limits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import anyio

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
        self.outstanding_bytes = 0  # their payload bytes (what is kept of a too_large one)
        self.acknowledged = 0
        self.lost_connection = 0
        self._next_seq = 0
        self._held: dict[int, Sequence[Delivery]] = {}
        self._room: anyio.Event | None = None  # set by the release that brings bytes under
        self._room_at = 0

    def received(self, size: int) -> None:
        """A message of ``size`` payload bytes (``len(envelope.payload)``) was handed on."""
        self.outstanding += 1
        self.outstanding_bytes += size

    async def wait_bytes_at_most(self, bound: int) -> None:
        """Return once ``outstanding_bytes <= bound``: woken by the release that brings them
        there, never by polling."""
        while self.outstanding_bytes > bound:
            self._room = anyio.Event()
            self._room_at = bound
            try:
                await self._room.wait()
            finally:
                self._room = None

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
            self.outstanding_bytes -= sum([len(d.envelope.payload) for d in batch])
            released += len(batch)
        if self._room is not None and self.outstanding_bytes <= self._room_at:
            self._room.set()
        return released

    def statistics(self) -> AckStatistics:
        return AckStatistics(
            outstanding=self.outstanding,
            outstanding_bytes=self.outstanding_bytes,
            acknowledged=self.acknowledged,
            lost_connection=self.lost_connection,
            held_batches=len(self._held),
        )
