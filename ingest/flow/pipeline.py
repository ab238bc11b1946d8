"""Wires the stages of the flow: source -> channel -> batcher -> writer -> acker.

The delivery contract this module keeps (docs/contract.md names and tests each clause):

* C1 ack-after-commit: a message is acknowledged only once the transaction holding its rows
  or its dead letter committed. A batch is handed to the acker after ``writer.write``
  returned, never before; a write that raises acknowledges nothing.
* C2 receive-order: batches are numbered as they are cut and the acker releases them in that
  order, whichever commits first.
* C3, C4 are the writer's (duplicates collapse on their key; a bad message is one dead letter
  in its batch's transaction); C5 follows from C1 and C3; C6 is the acker's and the session's
  (a closed connection acknowledges nothing).

The channel is a bounded anyio memory object stream; its capacity is the only buffer the
pipeline owns (the broker's in-flight window bounds what the MQTT client holds). Draining is
done by closing the channel's send side, never with flags: the batcher sees ``EndOfStream``,
the last batch is written and acknowledged, then ``drained`` is set for the source to
disconnect.

Collaborators are passed in (writer, acker, source factory, commit hook), so a test can hand
the pipeline a writer that blocks or raises and an acknowledger that records what it sends.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ingest.flow.acker import Acker, Delivery
from ingest.flow.batcher import Batcher
from ingest.flow.source import Source
from ingest.flow.writer import Writer, WriteResult
from ingest.logs import log_context
from ingest.model import Envelope, PipelineStatistics, SourceStatistics
from ingest.settings import Settings

__all__ = ["BatchWriter", "CommitHook", "Pipeline", "PipelineSource", "SourceFactory"]

#: Called once per committed batch: (batch, result, seconds the write took, ``time.time()`` at
#: commit). The daemon passes the observability's recorder here.
CommitHook = Callable[[Sequence[Delivery], WriteResult, float, float], None]


class BatchWriter(Protocol):
    """What the pipeline needs of the writer: store one batch in one transaction (or narrow
    it down), return what happened; raise when it cannot (nothing is acknowledged then)."""

    async def write(self, envelopes: Sequence[Envelope], /) -> WriteResult: ...


class PipelineSource(Protocol):
    """What the pipeline needs of the source (``ingest.flow.source.Source``)."""

    async def run(self, send: MemoryObjectSendStream[Delivery], /) -> None: ...

    def stop_reading(self) -> None: ...

    def statistics(self) -> SourceStatistics: ...


#: Builds the source, given the acker it reports received messages to and the event the
#: pipeline sets once everything is written and acknowledged (the source disconnects then).
SourceFactory = Callable[[Acker, anyio.Event], PipelineSource]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        writer: BatchWriter,
        *,
        acker: Acker | None = None,
        source: SourceFactory | None = None,
        on_commit: CommitHook | None = None,
        log: logging.Logger,
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._log = log
        self._on_commit = on_commit
        self.acker = acker if acker is not None else Acker()
        self.drained = anyio.Event()
        if source is None:
            self.source: PipelineSource = Source(
                settings,
                acker=self.acker,
                drained=self.drained,
                log=log,
                # The daemon's writer reads the Sparkplug births back (test writers hold none).
                births=writer.sparkplug_births if isinstance(writer, Writer) else None,
            )
        else:
            self.source = source(self.acker, self.drained)
        self._send, self._receive = anyio.create_memory_object_stream[Delivery](
            settings.channel_capacity
        )
        # Batches written at once, one per database connection: while one commits the next
        # is collected and written. The acker still releases them in receive order.
        self._concurrency = settings.db_pool_size
        self.batcher = Batcher(
            self._receive,
            max_rows=settings.batch_max_rows,
            max_delay=settings.batch_max_delay,
            window=settings.mqtt_inflight,
            outstanding=lambda: self.acker.outstanding,
            concurrency=self._concurrency,
            log=log,
        )
        self.rows_inserted = 0
        self.duplicates = 0
        self.dead_letters = 0
        self.dead_reasons: Counter[str] = Counter()
        self.last_commit_lag: float | None = None
        self.last_commit_at: float | None = None

    def stop_reading(self) -> None:
        self.source.stop_reading()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.source.run, self._send, name="ingest[source]")
            tg.start_soon(self._write_loop, name="ingest[writer]")

    async def _write_loop(self) -> None:
        # A batch is cut only once a connection is free for it (the writer pulls: whatever
        # piled up meanwhile goes into one batch). A failed write raises out of the task group,
        # cancelling the others: nothing of theirs is acknowledged, the broker redelivers it.
        free = anyio.Semaphore(self._concurrency)
        seq = 0
        async with self._receive, anyio.create_task_group() as tg:
            while True:
                await free.acquire()
                batch = await self.batcher.next_batch()
                if batch is None:
                    break
                tg.start_soon(self._write_batch, seq, batch, free, name=f"ingest[batch {seq}]")
                seq += 1
        self.drained.set()

    async def _write_batch(self, seq: int, batch: list[Delivery], free: anyio.Semaphore) -> None:
        try:
            started = time.perf_counter()
            with log_context(batch=seq):  # every line the writer logs names the batch
                result = await self._writer.write([d.envelope for d in batch])
            self.acker.release(seq, batch)
        finally:
            free.release()
        self.rows_inserted += result.inserted
        self.duplicates += result.duplicates
        self.dead_letters += result.dead_letters
        self.dead_reasons.update(result.dead_reasons)
        now = time.time()
        self.last_commit_at = now
        self.last_commit_lag = now - batch[0].envelope.received_at.timestamp()
        if self._on_commit is not None:
            self._on_commit(batch, result, time.perf_counter() - started, now)

    def statistics(self) -> PipelineStatistics:
        src = self.source.statistics()
        ack = self.acker.statistics()
        ch = self._send.statistics()
        return PipelineStatistics(
            received=src.received,
            acknowledged=ack.acknowledged,
            outstanding=ack.outstanding,
            rows_inserted=self.rows_inserted,
            duplicates=self.duplicates,
            dead_letters=self.dead_letters,
            dead_reasons=dict(self.dead_reasons),
            fields_skipped=src.fields_skipped,
            batches=self.batcher.batches,
            channel_depth=ch.current_buffer_used,
            inbox=src.inbox,
            channel_capacity=self._settings.channel_capacity,
            window=self.batcher.window,
            last_commit_lag=self.last_commit_lag,
            subscribed=src.subscribed,
        )
