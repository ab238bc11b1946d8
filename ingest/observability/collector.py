"""The counters and gauges of ``/metrics``, read from the stages' statistics at scrape time.

Costs nothing per message. Counters and gauges are not incremented on the hot path: every
stage already keeps plain integer totals for its ``statistics()`` (anyio style), and
:class:`IngestCollector` turns a :class:`Snapshot` of them into metric families when Prometheus
scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest._version import __version__
from ingest.flow.writer import REJECTED_BY_DATABASE
from ingest.formats.decode import REASONS
from ingest.model import (
    AckStatistics,
    BatcherStatistics,
    DashboardStatistics,
    SourceStatistics,
    SparkplugStatistics,
    WriterStatistics,
)
from ingest.mqtt.answers import CAUSES

if TYPE_CHECKING:
    from ingest.flow.pipeline import Pipeline
    from ingest.flow.writer import Writer
    from ingest.model import PipelineStatistics

__all__ = ["IngestCollector", "Snapshot"]

# Label values that exist before the first event, so rate() and alerts see a 0, not a gap.
_DEAD_LETTER_REASONS = (*REASONS, REJECTED_BY_DATABASE)
_RETRY_CLASSES = ("transient", "row")
_DISCONNECT_CAUSES = CAUSES
_PARSE_PATHS = ("fast", "paho")
_CUT_CAUSES = ("rows", "delay", "window")
_REBIRTH_OUTCOMES = ("sent", "suppressed", "failed")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The statistics of every stage at one instant; ``last_commit_at`` is a ``time.time()``;
    ``dashboard`` is None when the daemon does not report its dashboard fold."""

    pipeline: PipelineStatistics
    source: SourceStatistics
    acker: AckStatistics
    batcher: BatcherStatistics
    writer: WriterStatistics
    last_commit_at: float | None
    dashboard: DashboardStatistics | None = None

    @classmethod
    def of(
        cls, pipeline: Pipeline, writer: Writer, dashboard: DashboardStatistics | None = None
    ) -> Snapshot:
        return cls(
            pipeline=pipeline.statistics(),
            source=pipeline.source.statistics(),
            acker=pipeline.acker.statistics(),
            batcher=pipeline.batcher.statistics(),
            writer=writer.statistics(),
            last_commit_at=pipeline.last_commit_at,
            dashboard=dashboard,
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
        yield self._f.gauge(
            "ingest_build_info", "Version of iot-ingest running (always 1).", 1,
            version=__version__,
        )  # fmt: skip
        s = self._snapshot()
        if s is None:  # still waiting for the database at start-up
            return
        yield from _messages(self._f, s)
        yield from _batches(self._f, s)
        yield from _broker(self._f, s.source)
        yield from _backlog(self._f, s)
        yield from _database(self._f, s)
        if s.source.sparkplug is not None:
            yield from _sparkplug(self._f, s.source.sparkplug)
        if s.dashboard is not None:
            yield from _dashboard(self._f, s.dashboard)


def _messages(f: _Families, s: Snapshot) -> Iterator[Metric]:
    """What happened to the messages: received, acknowledged, stored, dead-lettered."""
    yield f.counter(
        "ingest_messages_received", "MQTT messages received (decoded or not).", s.pipeline.received
    )
    yield f.counter(
        "ingest_messages_acknowledged",
        "Messages acknowledged to the broker (PUBACK) after their batch committed.",
        s.acker.acknowledged,
    )
    yield f.counter(
        "ingest_messages_ack_lost",
        "Committed messages whose connection closed before their PUBACK; the broker "
        "redelivers them and the idempotent write absorbs them.",
        s.acker.lost_connection,
    )
    yield f.counter(
        "ingest_readings_written",
        "Readings inserted, numeric (readings) and text (text_readings).",
        s.writer.rows_inserted,
    )
    yield f.counter(
        "ingest_series_created",
        "Series (device, metric) created by this writer on their first reading.",
        s.writer.series_created,
    )
    yield f.gauge(
        "ingest_series_cached",
        "(device, metric) -> series id pairs held in memory (INGEST_SERIES_CACHE_SIZE).",
        s.writer.series_cached,
    )
    yield f.counter(
        "ingest_series_cache_evictions",
        "Series dropped from the full series cache, whole devices at a time (looked up again "
        "when they next send).",
        s.writer.series_evicted,
    )
    yield f.counter(
        "ingest_readings_duplicates",
        "Numeric and text readings not inserted because their series and ts were already stored.",
        s.writer.duplicates,
    )
    yield f.counter_by(
        "ingest_dead_letters",
        "Messages stored as dead letters, by reason.",
        "reason",
        s.pipeline.dead_reasons,
        _DEAD_LETTER_REASONS,
    )
    yield f.counter(
        "ingest_fields_skipped",
        "Payload fields stored nowhere (nulls, lists, non-finite numbers, text over the size limit).",
        s.pipeline.fields_skipped,
    )


def _batches(f: _Families, s: Snapshot) -> Iterator[Metric]:
    b = s.batcher
    yield f.counter("ingest_batches", "Batches committed to the database.", s.writer.batches)
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
        "connection loss, timeout, ...; row: spent narrowing a batch down to rejected rows or "
        "splitting one that timed out while the database answered).",
        "class",
        s.writer.retries_by_class,
        _RETRY_CLASSES,
    )


def _broker(f: _Families, src: SourceStatistics) -> Iterator[Metric]:
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
    yield f.counter_by(
        "ingest_mqtt_messages_parsed",
        "MQTT PUBLISH packets read, by who parsed them (fast: the daemon's own parser, from "
        "its read buffer; paho: the client library, for packets split across reads, QoS 2 and "
        "the unusual). Over the payload limit they are counted as dead letters too_large.",
        "path",
        {"fast": src.parsed_fast, "paho": src.parsed_paho},
        _PARSE_PATHS,
    )
    yield f.gauge(
        "ingest_broker_connected", "1 when connected to the MQTT broker.", int(src.connected)
    )
    yield f.gauge(
        "ingest_broker_subscribed", "1 when subscribed to the topic filter.", int(src.subscribed)
    )


def _sparkplug(f: _Families, sp: SparkplugStatistics) -> Iterator[Metric]:
    """The Sparkplug alias tables and Rebirth requests (only with a sparkplug route)."""
    yield f.counter_by(
        "ingest_sparkplug_rebirth_requests",
        "Rebirth requests (NCMD) for edge nodes whose data named an alias no birth declared, "
        "by outcome (sent; suppressed: the node was asked within "
        "INGEST_SPARKPLUG_REBIRTH_INTERVAL; failed: no connection).",
        "outcome",
        {"sent": sp.rebirths_sent, "suppressed": sp.rebirths_suppressed,
         "failed": sp.rebirths_failed},
        _REBIRTH_OUTCOMES,
    )  # fmt: skip
    yield f.counter(
        "ingest_sparkplug_stale_deaths",
        "NDEATHs whose bdSeq is not the last NBIRTH's (an earlier session's): changed nothing.",
        sp.stale_deaths,
    )
    yield f.counter(
        "ingest_sparkplug_nodes_evicted",
        "Edge nodes whose alias tables were forgotten to stay under INGEST_SPARKPLUG_MAX_ALIASES.",
        sp.nodes_evicted,
    )
    yield f.gauge(
        "ingest_sparkplug_aliases",
        "Sparkplug metric declarations held (plus one per edge node and device).",
        sp.aliases,
    )
    yield f.gauge("ingest_sparkplug_nodes", "Edge nodes whose births are held.", sp.nodes)


def _backlog(f: _Families, s: Snapshot) -> Iterator[Metric]:
    """What waits between the broker and the database, and the bounds on it."""
    yield f.gauge(
        "ingest_channel_depth",
        "Messages waiting in the bounded channel between source and batcher.",
        s.pipeline.channel_depth,
    )
    yield f.gauge(
        "ingest_channel_capacity",
        "Capacity of that channel (backpressure bound).",
        s.pipeline.channel_capacity,
    )
    yield f.gauge(
        "ingest_messages_unacknowledged",
        "Messages received and not yet acknowledged (in the channel, the batch being "
        "written, or waiting for earlier batches).",
        s.acker.outstanding,
    )
    yield f.gauge(
        "ingest_messages_unacknowledged_bytes",
        "Payload bytes of those messages (what is kept of a too_large one); the source stops "
        "taking messages above INGEST_MQTT_INFLIGHT_BYTES.",
        s.acker.outstanding_bytes,
    )
    yield f.gauge(
        "ingest_inflight_window",
        "Unacknowledged messages the broker is expected to send at most (configured, or "
        "smaller when the batcher observed a smaller broker window).",
        s.batcher.window,
    )


def _database(f: _Families, s: Snapshot) -> Iterator[Metric]:
    yield f.gauge(
        "ingest_database_connected",
        "1 when the last database round trip succeeded.",
        int(s.writer.connected),
    )
    if s.last_commit_at is not None:
        yield f.gauge(
            "ingest_last_commit_timestamp_seconds",
            "Unix time of the last committed batch.",
            s.last_commit_at,
        )


def _dashboard(f: _Families, d: DashboardStatistics) -> Iterator[Metric]:
    """The fold that keeps the latest values, devices and rollups current."""
    yield f.counter(
        "ingest_dashboard_folds",
        "Dashboard fold rounds that succeeded (whether or not batches were pending).",
        d.folds,
    )
    yield f.counter(
        "ingest_dashboard_fold_failures",
        "Dashboard folds that failed (each is retried; /readyz turns not-ready when they "
        "keep failing for longer than ready_max_lag).",
        d.fold_failures,
    )
    yield f.counter(
        "ingest_dashboard_set_aside",
        "Committed batches set aside because they could not be folded into the dashboard "
        "tables (their readings stay stored).",
        d.set_aside,
    )
    yield f.gauge(
        "ingest_dashboard_pending_batches",
        "Committed batches waiting to be folded into the dashboard tables.",
        d.pending_batches,
    )
