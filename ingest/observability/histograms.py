"""The four histograms, observed once per committed batch (never per message).

The two lag histograms are sampled with the batch's first and last message only: enough to
follow the lag, at a cost that does not grow with the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram

from ingest.model import Decoded

if TYPE_CHECKING:
    from ingest.flow.acker import Delivery
    from ingest.flow.writer import WriteResult

__all__ = ["CommitHistograms"]

BATCH_ROWS_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)
COMMIT_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
LAG_SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900,
)  # fmt: skip
DEVICE_LAG_SECONDS_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400,
)  # fmt: skip


class CommitHistograms:
    """Batch size, commit duration, receive-to-commit lag and device-to-commit lag."""

    def __init__(self, registry: CollectorRegistry, *, worker: str | None = None) -> None:
        labels = ("worker",) if worker is not None else ()

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            h = Histogram(name, doc, labels, registry=registry, buckets=buckets)
            return h.labels(worker) if worker is not None else h

        self._batch_rows = histogram(
            "ingest_batch_size_rows",
            "Rows per committed batch (readings, duplicates and dead letters).",
            BATCH_ROWS_BUCKETS,
        )
        self._commit_seconds = histogram(
            "ingest_batch_commit_duration_seconds",
            "Time to store one batch, retries and narrowing included.",
            COMMIT_SECONDS_BUCKETS,
        )
        self._commit_lag = histogram(
            "ingest_commit_lag_seconds",
            "Commit time minus receive time, sampled with the first and last message of "
            "each batch.",
            LAG_SECONDS_BUCKETS,
        )
        self._device_lag = histogram(
            "ingest_device_lag_seconds",
            "Commit time minus the device timestamp (ts), sampled with the first reading of "
            "the first and last message of each batch; negative values (device clock ahead) "
            "count as 0.",
            DEVICE_LAG_SECONDS_BUCKETS,
        )

    def record(
        self, batch: Sequence[Delivery], result: WriteResult, seconds: float, at: float
    ) -> None:
        """Observe one committed batch (``at``: ``time.time()`` of the commit)."""
        self._batch_rows.observe(result.inserted + result.duplicates + result.dead_letters)
        self._commit_seconds.observe(seconds)
        if not batch:
            return
        ends = (batch[0].envelope,) if len(batch) == 1 else (batch[0].envelope, batch[-1].envelope)
        for envelope in ends:
            self._commit_lag.observe(max(0.0, at - envelope.received_at.timestamp()))
            decoded = envelope.result
            if isinstance(decoded, Decoded) and decoded.readings:
                self._device_lag.observe(max(0.0, at - decoded.readings[0].ts.timestamp()))
