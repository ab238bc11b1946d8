"""Stage 4, the batcher: cuts the stream of decoded messages into batches for the writer.

The writer pulls: ``next_batch()`` is called when the writer is free, and everything that piled
up in the channel meanwhile is taken at once. A batch is cut when

* it holds ``max_rows`` rows, or
* ``max_delay`` has passed since its first message (a light load still gets written promptly), or
* every unacknowledged message the broker allows in flight is already in hand: nothing more can
  arrive before we acknowledge, so waiting would only ever end by the timer. The broker's window
  is ``window`` (configured) unless a smaller one is observed: a wait that ends with no new
  message while exactly K messages are outstanding, several times in a row under load, means the
  broker's window is K (Mosquitto's default is 20). That is logged once as a warning, since it
  caps throughput;
* it holds its share of that window, ``window // concurrency`` messages, when the writer
  writes up to ``concurrency`` batches at once: a batch that took the whole window would leave
  nothing for the next one to collect while it commits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ingest.flow.acker import Delivery
from ingest.model import BatcherStatistics, Decoded

__all__ = ["Batcher", "rows_of"]


def rows_of(d: Delivery) -> int:
    """Rows a delivery adds to a batch: its numeric and text readings, or one dead letter."""
    result = d.envelope.result
    return len(result.readings) + len(result.texts) if isinstance(result, Decoded) else 1


class Batcher:
    _STALLS_BEFORE_SUSPECTING = 3

    def __init__(
        self,
        receive: MemoryObjectReceiveStream[Delivery],
        *,
        max_rows: int,
        max_delay: float,
        window: int,
        outstanding: Callable[[], int],
        concurrency: int = 1,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self._rx = receive
        self._max_rows = max_rows
        self._max_delay = max_delay
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        self._window = window
        self._concurrency = concurrency
        self._outstanding = outstanding
        self._log = log or logging.getLogger("ingest.batcher")
        self._clock = clock
        self._ended = False
        self._observed_window: int | None = None
        self._stall_value = -1
        self._stall_count = 0
        self._warned = False
        self.batches = 0
        self.cut_by_rows = 0
        self.cut_by_delay = 0
        self.cut_by_window = 0

    @property
    def window(self) -> int:
        return self._observed_window or self._window

    async def next_batch(self) -> list[Delivery] | None:
        """The next batch, or None once the channel is closed and empty."""
        if self._ended:
            return None
        first, busy = await self._first()
        if first is None:
            return None
        batch = [first]
        rows = rows_of(first)
        deadline = self._clock() + self._max_delay
        share = max(1, self.window // self._concurrency)
        while rows < self._max_rows:
            if len(batch) >= share:
                self.cut_by_window += 1
                break
            try:  # the fast path, once per message under load: no coroutine
                item = self._rx.receive_nowait()
            except anyio.WouldBlock:
                more = await self._more(deadline, busy)
                if more is None:
                    break
                item = more
            except anyio.EndOfStream:
                self._ended = True
                break
            batch.append(item)
            rows += rows_of(item)
        else:
            self.cut_by_rows += 1
        self.batches += 1
        return batch

    async def _first(self) -> tuple[Delivery | None, bool]:
        """The batch's first message (None once the channel is closed and empty), and whether
        it was already waiting: then we are under load (see :meth:`_note_stall`)."""
        try:
            return self._rx.receive_nowait(), True
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            self._ended = True
            return None, False
        try:
            return await self._rx.receive(), False
        except anyio.EndOfStream:
            self._ended = True
            return None, False

    async def _more(self, deadline: float, busy: bool) -> Delivery | None:
        """Nothing waits in the channel: the batch's next message once it arrives, or None when
        the batch ends here: the channel ended, or the batch is cut (counted by cause) because
        the window is in hand or time is up."""
        outstanding = self._outstanding()
        if self._observed_window is not None and outstanding > self._observed_window:
            self._observed_window = None  # the broker sent more: it was not the window
        if outstanding >= self.window:
            self.cut_by_window += 1
            return None
        remaining = deadline - self._clock()
        if remaining <= 0:
            self.cut_by_delay += 1
            return None
        return await self._wait(remaining, outstanding, busy)

    async def _wait(self, remaining: float, outstanding: int, busy: bool) -> Delivery | None:
        """One more message within ``remaining`` seconds, else None (a cut by delay, unless
        the channel ended)."""
        with anyio.move_on_after(remaining):
            try:
                return await self._rx.receive()
            except anyio.EndOfStream:
                self._ended = True
                return None
        self.cut_by_delay += 1
        self._note_stall(outstanding, busy)
        return None

    def _note_stall(self, outstanding: int, busy: bool) -> None:
        """A wait ended by the timer with nothing new while ``outstanding`` were unacked."""
        if not busy or outstanding < 2:
            self._stall_count = 0
            return
        if outstanding == self._stall_value:
            self._stall_count += 1
        else:
            self._stall_value, self._stall_count = outstanding, 1
        if self._stall_count >= self._STALLS_BEFORE_SUSPECTING and outstanding < self.window:
            self._observed_window = outstanding
            if not self._warned:
                self._warned = True
                self._log.warning(
                    "the broker seems to allow only %d unacknowledged messages in flight "
                    "(configured window %d): batches are capped at %d messages, which limits "
                    "throughput; raise max_inflight_messages on the broker (see README)",
                    outstanding,
                    self._window,
                    outstanding,
                )

    def statistics(self) -> BatcherStatistics:
        return BatcherStatistics(
            batches=self.batches,
            cut_by_rows=self.cut_by_rows,
            cut_by_delay=self.cut_by_delay,
            cut_by_window=self.cut_by_window,
            window=self.window,
            observed_window=self._observed_window,
        )
