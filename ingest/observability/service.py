"""The observability of one daemon process: registry, histograms, health state, HTTP routes.

Only the histograms are real ``prometheus_client`` histograms, observed once per committed
batch by :meth:`Observability.batch_committed` (the pipeline's ``on_commit`` hook); the two lag
histograms are sampled there with the batch's first and last message, not with every message.
Counters and gauges come from :class:`~ingest.observability.collector.IngestCollector`.

* ``GET /metrics``: Prometheus text exposition (``ingest_*`` plus ``process_*``).
* ``GET /healthz``: 200 while the loop runs (:mod:`ingest.observability.health`).
* ``GET /readyz``: 200 when ready, else 503 with ``{"ready": false, "reason": ...}``; the
  database ping it may need is cached for a second, so probes cannot flood it.

With several worker processes, each constructs :class:`Observability` with ``worker="<n>"``
(see :mod:`ingest.observability.merge`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Listener, SocketStream
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

from ingest.errors import ConfigError
from ingest.flow.acker import Delivery
from ingest.flow.writer import WriteResult
from ingest.model import Decoded
from ingest.observability.collector import IngestCollector, Snapshot
from ingest.observability.health import (
    HEALTHY_HEARTBEAT_AGE,
    HEARTBEAT_INTERVAL,
    CommitProgress,
    Readiness,
    assess_readiness,
)
from ingest.observability.http import _JSON, _json, handle_http

if TYPE_CHECKING:
    from ingest.flow.pipeline import Pipeline
    from ingest.flow.writer import Writer
    from ingest.settings import Settings

__all__ = ["Observability"]

_log = logging.getLogger("ingest.metrics")

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

PING_CACHE = 1.0
PING_TIMEOUT = 2.0


class Observability:
    """Metrics registry, histograms, health state and HTTP endpoint of one daemon process."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        ready_max_lag: float,
        worker: str | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.ready_max_lag = ready_max_lag
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        self._pipeline: Pipeline | None = None
        self._writer: Writer | None = None
        self.registry.register(IngestCollector(self.snapshot, worker=worker))
        if process_metrics:
            ProcessCollector(registry=self.registry)
        labels = ("worker",) if worker is not None else ()

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            h = Histogram(name, doc, labels, registry=self.registry, buckets=buckets)
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
        self._beat = time.monotonic()
        self._progress = CommitProgress()
        self._ping_at = -PING_CACHE
        self._ping_ok = False
        self._ping_error = ""
        self._ping_lock = anyio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, worker: str | None = None) -> Observability:
        return cls(
            host=settings.metrics_host,
            port=settings.metrics_port,
            ready_max_lag=settings.ready_max_lag,
            worker=worker,
        )

    def attach(self, pipeline: Pipeline, writer: Writer) -> None:
        """Start reporting on ``pipeline`` and ``writer``, and observe its batches."""
        self._pipeline = pipeline
        self._writer = writer
        pipeline.on_commit = self.batch_committed

    def snapshot(self) -> Snapshot | None:
        if self._pipeline is None or self._writer is None:
            return None
        return Snapshot.of(self._pipeline, self._writer)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- once per batch ------------------------------------------------------------------------

    def batch_committed(
        self, batch: Sequence[Delivery], result: WriteResult, seconds: float, committed_at: float
    ) -> None:
        """Observe the histograms for one committed batch (``committed_at``: ``time.time()``)."""
        self._batch_rows.observe(result.inserted + result.duplicates + result.dead_letters)
        self._commit_seconds.observe(seconds)
        if not batch:
            return
        ends = (batch[0].envelope,) if len(batch) == 1 else (batch[0].envelope, batch[-1].envelope)
        for envelope in ends:
            self._commit_lag.observe(max(0.0, committed_at - envelope.received_at.timestamp()))
            decoded = envelope.result
            if isinstance(decoded, Decoded) and decoded.readings:
                ts = decoded.readings[0].ts.timestamp()
                self._device_lag.observe(max(0.0, committed_at - ts))

    # -- health ----------------------------------------------------------------------------------

    def beat(self, now: float | None = None) -> None:
        """Heartbeat: stamp the time and follow commit progress (see :func:`current_lag`)."""
        now = time.monotonic() if now is None else now
        self._beat = now
        if self._pipeline is not None:
            self._progress.observe(self._pipeline.acker.statistics(), now)

    def liveness(self, now: float | None = None) -> tuple[bool, dict[str, Any]]:
        age = (time.monotonic() if now is None else now) - self._beat
        if age > HEALTHY_HEARTBEAT_AGE:
            return False, {"alive": False, "reason": f"event loop stalled for {age:.1f}s"}
        return True, {"alive": True}

    async def readiness(self) -> Readiness:
        snapshot = self.snapshot()
        verdict = self._assess(snapshot, None)
        if verdict is not None:
            return verdict
        await self._ping()
        verdict = self._assess(snapshot, self._ping_ok)
        assert verdict is not None
        return verdict

    def _assess(self, snapshot: Snapshot | None, reachable: bool | None) -> Readiness | None:
        return assess_readiness(
            snapshot,
            now=time.time(),
            stalled_for=self._progress.stalled_for(time.monotonic()),
            max_lag=self.ready_max_lag,
            database_reachable=reachable,
            database_error=self._ping_error,
        )

    async def _ping(self) -> None:
        """One ``SELECT 1`` at most every PING_CACHE seconds, however many probes ask."""
        async with self._ping_lock:
            if time.monotonic() - self._ping_at < PING_CACHE or self._writer is None:
                return
            ok, error = False, "ping timed out"
            with anyio.move_on_after(PING_TIMEOUT):
                try:
                    await self._writer.ping()
                    ok, error = True, ""
                except Exception as exc:
                    error = type(exc).__name__
            self._ping_at = time.monotonic()
            self._ping_ok, self._ping_error = ok, error

    # -- HTTP ------------------------------------------------------------------------------------

    async def listen(self) -> Listener[SocketStream] | None:
        """Bind the port (None when disabled); a port that cannot be bound is a ConfigError."""
        if self.port == 0:
            return None
        try:
            return await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        except OSError as exc:
            raise ConfigError(
                "INGEST_METRICS_PORT",
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
            ) from None

    async def serve(self, listener: Listener[SocketStream] | None) -> None:
        """Answer HTTP requests and run the heartbeat until cancelled."""
        if listener is None:
            return
        _log.info(
            "metrics and health on http://%s:%d/metrics, /healthz, /readyz", self.host, self.port
        )
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat, name="ingest[heartbeat]")
            while True:
                try:
                    await listener.serve(self._handle, tg)
                except OSError as exc:  # e.g. out of file descriptors: never stop the daemon
                    _log.warning("metrics endpoint: accept failed (%s); retrying in 1s", exc)
                    await anyio.sleep(1)

    async def _heartbeat(self) -> None:
        while True:
            self.beat()
            await anyio.sleep(HEARTBEAT_INTERVAL)

    async def _handle(self, stream: SocketStream) -> None:
        await handle_http(stream, self._route)

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.exposition()
        if path == "/healthz":
            ok, body = self.liveness()
            return (200 if ok else 503), _JSON, _json(body)
        if path == "/readyz":
            verdict = await self.readiness()
            return (200 if verdict.ready else 503), _JSON, _json(verdict.body())
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz, /readyz\n"
