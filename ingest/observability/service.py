"""The observability of one daemon process: registry, histograms, health state, HTTP routes.

* ``GET /metrics``: Prometheus text exposition (``ingest_*`` plus ``process_*``): counters and
  gauges read from the stages' statistics at scrape time
  (:mod:`~ingest.observability.collector`), histograms observed once per committed batch
  (:meth:`Observability.record_commit`, the pipeline's commit hook).
* ``GET /healthz``: 200 while the loop runs (:mod:`~ingest.observability.health`).
* ``GET /readyz``: 200 when ready, else 503 with ``{"ready": false, "reason": ...}``.

It only reads what it observes: the pipeline calls :meth:`Observability.record_commit` (a hook
given to it at construction), and nothing here writes into the pipeline. With several worker
processes, each constructs :class:`Observability` with ``worker="<n>"`` and every family
carries that label (see :mod:`~ingest.observability.merge`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Listener, SocketStream
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from ingest.model import DashboardStatistics
from ingest.observability.collector import IngestCollector, Snapshot
from ingest.observability.health import (
    HEALTHY_HEARTBEAT_AGE,
    HEARTBEAT_INTERVAL,
    CommitProgress,
    DatabasePing,
    Readiness,
    assess_readiness,
)
from ingest.observability.histograms import CommitHistograms
from ingest.observability.http import (
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    Response,
    bind,
    json_response,
    serve_http,
)

if TYPE_CHECKING:
    from ingest.flow.acker import Delivery
    from ingest.flow.pipeline import Pipeline
    from ingest.flow.writer import Writer, WriteResult
    from ingest.settings import Settings

__all__ = ["Observability"]

_log = logging.getLogger("ingest.metrics")


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
        self._dashboard: Callable[[], DashboardStatistics] | None = None
        self.registry.register(IngestCollector(self.snapshot, worker=worker))
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self._histograms = CommitHistograms(self.registry, worker=worker)
        self._beat = time.monotonic()
        self._progress = CommitProgress()
        self._ping = DatabasePing()

    @classmethod
    def from_settings(cls, settings: Settings, *, worker: str | None = None) -> Observability:
        return cls(
            host=settings.metrics_host,
            port=settings.metrics_port,
            ready_max_lag=settings.ready_max_lag,
            worker=worker,
        )

    def attach(
        self,
        pipeline: Pipeline,
        writer: Writer,
        *,
        dashboard: Callable[[], DashboardStatistics] | None = None,
    ) -> None:
        """Start reporting on ``pipeline``, ``writer`` and, when given, the dashboard fold's
        statistics. The pipeline's batches are observed through :meth:`record_commit`, which
        the pipeline is given as its commit hook."""
        self._pipeline = pipeline
        self._writer = writer
        self._dashboard = dashboard

    def snapshot(self) -> Snapshot | None:
        if self._pipeline is None or self._writer is None:
            return None
        dashboard = self._dashboard() if self._dashboard is not None else None
        return Snapshot.of(self._pipeline, self._writer, dashboard)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def record_commit(
        self, batch: Sequence[Delivery], result: WriteResult, seconds: float, at: float
    ) -> None:
        """Observe one committed batch (``at``: ``time.time()`` of the commit): the pipeline's
        commit hook, called once per batch."""
        self._histograms.record(batch, result, seconds, at)

    # -- health ----------------------------------------------------------------------------------

    def beat(self, now: float | None = None) -> None:
        """Heartbeat: stamp the time and follow commit progress (see ``current_lag``)."""
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
        if verdict is None:  # no recent write: whether the database answers decides
            if self._writer is not None:
                await self._ping.refresh(self._writer)
            verdict = self._assess(snapshot, self._ping.ok)
        assert verdict is not None  # database_reachable given: always a verdict
        return verdict

    def _assess(self, snapshot: Snapshot | None, reachable: bool | None) -> Readiness | None:
        monotonic = time.monotonic()
        return assess_readiness(
            snapshot,
            now=time.time(),
            monotonic=monotonic,
            stalled_for=self._progress.stalled_for(monotonic),
            max_lag=self.ready_max_lag,
            database_reachable=reachable,
            database_error=self._ping.error,
        )

    # -- HTTP ------------------------------------------------------------------------------------

    async def listen(self) -> Listener[SocketStream] | None:
        """Bind the port (None when disabled); a port that cannot be bound is a ConfigError."""
        return await bind(self.host, self.port)

    async def serve(self, listener: Listener[SocketStream] | None) -> None:
        """Answer HTTP requests and run the heartbeat until cancelled."""
        if listener is None:
            return
        _log.info(
            "metrics and health on http://%s:%d/metrics, /healthz, /readyz", self.host, self.port
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat, name="ingest[heartbeat]")
            await serve_http(listener, self._route)

    async def _heartbeat(self) -> None:
        while True:
            self.beat()
            await anyio.sleep(HEARTBEAT_INTERVAL)

    async def _route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return METHOD_NOT_ALLOWED
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.exposition()
        if path == "/healthz":
            return json_response(*self.liveness())
        if path == "/readyz":
            verdict = await self.readiness()
            return json_response(verdict.ready, verdict.body())
        return NOT_FOUND
