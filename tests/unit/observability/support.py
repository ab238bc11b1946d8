"""Shared by the observability unit tests: a full snapshot of the stages, and parsed samples."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingest.model import (
    AckStatistics,
    BatcherStatistics,
    DashboardStatistics,
    PipelineStatistics,
    SourceStatistics,
    WriterStatistics,
)
from ingest.observability.collector import IngestCollector, Snapshot

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: bytes | str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(
        text.decode() if isinstance(text, bytes) else text
    ):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def snapshot(
    *,
    subscribed: bool = True,
    db_connected: bool = True,
    outstanding: int = 40,
    last_commit_at: float | None = 1000.0,
    last_commit_lag: float | None = 0.2,
    dashboard: DashboardStatistics | None = None,
) -> Snapshot:
    return Snapshot(
        pipeline=PipelineStatistics(
            received=1200,
            acknowledged=1150,
            outstanding=outstanding,
            rows_inserted=5000,
            duplicates=25,
            dead_letters=7,
            dead_reasons={"not_json": 5, "rejected_by_database": 2},
            fields_skipped=1100,
            batches=12,
            channel_depth=30,
            channel_capacity=2000,
            window=20,
            last_commit_lag=last_commit_lag,
            subscribed=subscribed,
        ),
        source=SourceStatistics(
            received=1200,
            decode_errors={"not_json": 5},
            fields_skipped=1100,
            connected=subscribed,
            subscribed=subscribed,
            connects=3,
            disconnects={"timeout": 1, "disconnected": 1},
        ),
        acker=AckStatistics(
            outstanding=outstanding, acknowledged=1150, lost_connection=10, held_batches=0
        ),
        batcher=BatcherStatistics(
            batches=13,
            cut_by_rows=4,
            cut_by_delay=6,
            cut_by_window=3,
            window=20,
            observed_window=20,
        ),
        writer=WriterStatistics(
            batches=12,
            rows_inserted=5000,
            duplicates=25,
            dead_letters=7,
            retries_by_class={"transient": 4},
            connected=db_connected,
            last_commit=123.0,
        ),
        last_commit_at=last_commit_at,
        dashboard=dashboard,
    )


def collect(snap: Snapshot | None, worker: str | None = None) -> Samples:
    registry = CollectorRegistry()
    registry.register(IngestCollector(lambda: snap, worker=worker))
    return samples(generate_latest(registry))
