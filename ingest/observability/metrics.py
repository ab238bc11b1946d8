"""Observability: Prometheus metrics, ``/healthz``, ``/readyz`` (issue 6).

Costs nothing per message. Counters and gauges are not incremented on the hot path: every
stage already keeps plain integer totals for its ``statistics()`` (anyio style), and
:class:`IngestCollector` turns a :class:`Snapshot` of them into metric families when Prometheus
scrapes. Only the histograms are real ``prometheus_client`` histograms, observed once per
committed batch by :meth:`Observability.batch_committed` (the pipeline's ``on_commit`` hook);
the two lag histograms are sampled there with the batch's first and last message, not with
every message.

The HTTP endpoint runs in the daemon's own event loop (anyio TCP listener, a few lines of
HTTP/1.1, ``Connection: close``), so an answer proves the loop is alive:

* ``GET /metrics``: Prometheus text exposition (``ingest_*`` plus ``process_*``).
* ``GET /healthz``: 200 while the loop runs; a heartbeat task stamps the time every 0.5 s and a
  stamp older than 5 s (the loop was blocked) answers 503.
* ``GET /readyz``: 200 only when subscribed to the broker, the database accepted a write in the
  last few seconds or answers a ping (cached for a second, so probes cannot flood it), and the
  receive-to-commit lag is under ``ready_max_lag``; else 503 with ``{"ready": false, "reason":
  ...}``. The lag is that of the last batch, or, while messages wait and no batch commits, how
  long that has lasted (so a database that hangs shows up even before a batch completes).

Several worker processes (``--workers``, issue 5): construct :class:`Observability` with
``worker="<n>"`` and every family (histograms too) carries a ``worker`` label; the process that
owns the port fetches each worker's :meth:`Observability.exposition` (over a pipe or a local
socket) and serves :func:`merge_expositions` of them. prometheus-client's multiprocess mode is
not used on purpose: it cannot run custom collectors across processes, so it would put a
counter increment on the hot path and label by pid instead of worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import Listener, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ingest._version import __version__
from ingest.errors import ConfigError
from ingest.flow.acker import Delivery
from ingest.flow.writer import REJECTED_BY_DATABASE, WriteResult
from ingest.formats.decode import REASONS
from ingest.model import (
    AckStatistics,
    BatcherStatistics,
    Decoded,
    SourceStatistics,
    WriterStatistics,
)

if TYPE_CHECKING:
    from ingest.flow.pipeline import Pipeline
    from ingest.flow.writer import Writer
    from ingest.model import PipelineStatistics
    from ingest.settings import Settings

__all__ = [
    "CommitProgress",
    "IngestCollector",
    "Observability",
    "Readiness",
    "Snapshot",
    "assess_readiness",
    "merge_expositions",
]

_log = logging.getLogger("ingest.metrics")

# Label values that exist before the first event, so rate() and alerts see a 0, not a gap.
_DEAD_LETTER_REASONS = (*REASONS, REJECTED_BY_DATABASE)
_RETRY_CLASSES = ("transient", "row")
_DISCONNECT_CAUSES = ("refused", "timeout", "disconnected", "error")
_CUT_CAUSES = ("rows", "delay", "window")

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

HEARTBEAT_INTERVAL = 0.5
HEALTHY_HEARTBEAT_AGE = 5.0
RECENT_WRITE = 5.0  # seconds: a commit this recent proves the database accepts writes
PING_CACHE = 1.0
PING_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0
MAX_REQUEST_HEAD = 8192


# -- what is read at scrape time -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The statistics of every stage at one instant; ``last_commit_at`` is a ``time.time()``."""

    pipeline: PipelineStatistics
    source: SourceStatistics
    acker: AckStatistics
    batcher: BatcherStatistics
    writer: WriterStatistics
    last_commit_at: float | None

    @classmethod
    def of(cls, pipeline: Pipeline, writer: Writer) -> Snapshot:
        return cls(
            pipeline=pipeline.statistics(),
            source=pipeline.source.statistics(),
            acker=pipeline.acker.statistics(),
            batcher=pipeline.batcher.statistics(),
            writer=writer.statistics(),
            last_commit_at=pipeline.last_commit_at,
        )


class _Families:
    """Builds metric families that all carry the same constant labels (``worker``)."""

    def __init__(self, const: Mapping[str, str]) -> None:
        self._names = list(const)
        self._values = list(const.values())

    def counter(self, name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(name, doc, labels=self._names)
        family.add_metric(self._values, value)
        return family

    def counter_by(
        self, name: str, doc: str, label: str, values: Mapping[str, int], known: Iterable[str]
    ) -> Metric:
        family = CounterMetricFamily(name, doc, labels=[*self._names, label])
        for key in sorted({*known, *values}):
            family.add_metric([*self._values, key], values.get(key, 0))
        return family

    def gauge(self, name: str, doc: str, value: float, **labels: str) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=[*self._names, *labels])
        family.add_metric([*self._values, *labels.values()], value)
        return family


class IngestCollector(Collector):
    """Counters and gauges of the pipeline, read from ``snapshot()`` at scrape time."""

    def __init__(
        self, snapshot: Callable[[], Snapshot | None], *, worker: str | None = None
    ) -> None:
        self._snapshot = snapshot
        self._f = _Families({"worker": worker} if worker is not None else {})

    def describe(self) -> list[Metric]:
        # Tells the registry not to call collect() at registration (the pipeline may not exist).
        return []

    def collect(self) -> Iterator[Metric]:
        f = self._f
        yield f.gauge(
            "ingest_build_info", "Version of iot-ingest running (always 1).", 1,
            version=__version__,
        )  # fmt: skip
        s = self._snapshot()
        if s is None:  # still waiting for the database at start-up
            return
        p, src, ack, b, w = s.pipeline, s.source, s.acker, s.batcher, s.writer
        yield f.counter(
            "ingest_messages_received", "MQTT messages received (decoded or not).", p.received
        )
        yield f.counter(
            "ingest_messages_acknowledged",
            "Messages acknowledged to the broker (PUBACK) after their batch committed.",
            ack.acknowledged,
        )
        yield f.counter(
            "ingest_messages_ack_lost",
            "Committed messages whose connection closed before their PUBACK; the broker "
            "redelivers them and the idempotent write absorbs them.",
            ack.lost_connection,
        )
        yield f.counter(
            "ingest_readings_written", "Readings inserted into the readings table.", w.rows_inserted
        )
        yield f.counter(
            "ingest_readings_duplicates",
            "Readings not inserted because (device_id, metric, ts) was already stored.",
            w.duplicates,
        )
        yield f.counter_by(
            "ingest_dead_letters",
            "Messages stored as dead letters, by reason.",
            "reason",
            p.dead_reasons,
            _DEAD_LETTER_REASONS,
        )
        yield f.counter(
            "ingest_fields_skipped",
            "Payload fields that are not readings (strings, nulls, lists, non-finite numbers).",
            p.fields_skipped,
        )
        yield f.counter("ingest_batches", "Batches committed to the database.", w.batches)
        yield f.counter_by(
            "ingest_batches_cut",
            "Batches cut by the batcher, by what ended them (rows: batch_max_rows reached, "
            "delay: batch_max_delay passed, window: the broker's in-flight window is in hand).",
            "cause",
            {"rows": b.cut_by_rows, "delay": b.cut_by_delay, "window": b.cut_by_window},
            _CUT_CAUSES,
        )
        yield f.counter_by(
            "ingest_write_retries",
            "Extra database transactions, by error class (transient: retried after a "
            "connection loss, timeout, ...; row: spent narrowing a batch down to rejected rows).",
            "class",
            w.retries_by_class,
            _RETRY_CLASSES,
        )
        yield f.counter(
            "ingest_broker_connects",
            "Successful broker connections (subscriptions); more than 1 means reconnects.",
            src.connects,
        )
        yield f.counter_by(
            "ingest_broker_disconnects",
            "Broker connections lost, by cause.",
            "cause",
            src.disconnects,
            _DISCONNECT_CAUSES,
        )
        yield f.gauge(
            "ingest_channel_depth",
            "Messages waiting in the bounded channel between source and batcher.",
            p.channel_depth,
        )
        yield f.gauge(
            "ingest_channel_capacity", "Capacity of that channel (backpressure bound).",
            p.channel_capacity,
        )  # fmt: skip
        yield f.gauge(
            "ingest_messages_unacknowledged",
            "Messages received and not yet acknowledged (in the channel, the batch being "
            "written, or waiting for earlier batches).",
            ack.outstanding,
        )
        yield f.gauge(
            "ingest_inflight_window",
            "Unacknowledged messages the broker is expected to send at most (configured, or "
            "smaller when the batcher observed a smaller broker window).",
            b.window,
        )
        yield f.gauge(
            "ingest_broker_connected", "1 when connected to the MQTT broker.", int(src.connected)
        )
        yield f.gauge(
            "ingest_broker_subscribed", "1 when subscribed to the topic filter.",
            int(src.subscribed),
        )  # fmt: skip
        yield f.gauge(
            "ingest_database_connected",
            "1 when the last database round trip succeeded.",
            int(w.connected),
        )
        if s.last_commit_at is not None:
            yield f.gauge(
                "ingest_last_commit_timestamp_seconds",
                "Unix time of the last committed batch.",
                s.last_commit_at,
            )


# -- readiness --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str
    lag: float | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready, "reason": self.reason}
        if self.lag is not None:
            out["lag_seconds"] = round(self.lag, 3)
        return out


class CommitProgress:
    """Follows, heartbeat by heartbeat, how long messages have waited with no batch released."""

    def __init__(self) -> None:
        self._released = -1
        self._since: float | None = None

    def observe(self, ack: AckStatistics, now: float) -> None:
        released = ack.acknowledged + ack.lost_connection
        if ack.outstanding == 0 or released != self._released:
            self._since = None
        elif self._since is None:
            self._since = now
        self._released = released

    def stalled_for(self, now: float) -> float:
        return 0.0 if self._since is None else now - self._since


def current_lag(snapshot: Snapshot, stalled_for: float) -> float:
    """Receive-to-commit lag now: 0 when nothing waits, else the last batch's lag or how long
    messages have waited without any batch committing, whichever is longer."""
    if snapshot.acker.outstanding == 0:
        return 0.0
    return max(snapshot.pipeline.last_commit_lag or 0.0, stalled_for)


def assess_readiness(
    snapshot: Snapshot | None,
    *,
    now: float,
    stalled_for: float,
    max_lag: float,
    database_reachable: bool | None,
    database_error: str = "",
) -> Readiness | None:
    """The verdict, or None when it depends on a database ping (``database_reachable`` None)."""
    if snapshot is None:
        return Readiness(False, "starting: waiting for the database")
    if not snapshot.source.subscribed:
        return Readiness(False, "not subscribed to the broker")
    wrote_recently = (
        snapshot.writer.connected
        and snapshot.last_commit_at is not None
        and now - snapshot.last_commit_at < RECENT_WRITE
    )
    if not wrote_recently:
        if database_reachable is None:
            return None
        if not database_reachable:
            return Readiness(False, f"database unreachable: {database_error}".rstrip(": "))
    lag = current_lag(snapshot, stalled_for)
    if lag >= max_lag:
        return Readiness(False, f"receive-to-commit lag {lag:.1f}s is over {max_lag:g}s", lag=lag)
    return Readiness(True, "ok", lag=lag)


# -- the daemon-side object -------------------------------------------------------------------


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


Route = Callable[[str, str], Awaitable[tuple[int, str, bytes]]]


async def handle_http(stream: SocketStream, route: Route) -> None:
    """Answer one HTTP/1.1 request on ``stream`` with ``route(method, path)``."""
    async with stream:
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                head = await BufferedByteReceiveStream(stream).receive_until(
                    b"\r\n\r\n", MAX_REQUEST_HEAD
                )
                method, _, rest = head.partition(b"\r\n")[0].decode("latin-1").partition(" ")
                path = rest.partition(" ")[0].partition("?")[0]
                status, content_type, body = await route(method, path)
                reason = _REASONS.get(status, "")
                header = (
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    "Cache-Control: no-store\r\n\r\n"
                ).encode("latin-1")
                await stream.send(header if method == "HEAD" else header + body)
        except (
            TimeoutError,
            OSError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.DelimiterNotFound,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            return  # a client that went away or sent garbage: nothing to answer
        except Exception:
            # A bug here must never take the daemon down with it (the handler runs in the
            # server's task group).
            _log.exception("metrics endpoint: request failed")


_JSON = "application/json"
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def _json(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode() + b"\n"


# -- several workers, one port ----------------------------------------------------------------


def merge_expositions(texts: Iterable[str]) -> bytes:
    """One exposition from several processes' (each labelled with its own ``worker``): the
    samples of a family are regrouped under one HELP/TYPE, as the text format requires."""
    families: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                families[family.name] = family
            else:
                merged.samples.extend(family.samples)

    class _Parsed(Collector):
        def collect(self) -> Iterable[Metric]:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Parsed())
    return generate_latest(registry)
