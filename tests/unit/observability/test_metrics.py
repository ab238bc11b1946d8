"""ingest.observability without sockets: collector output, histograms, readiness verdicts, merging."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from ingest.errors import DecodeError
from ingest.flow.acker import Delivery
from ingest.flow.writer import WriteResult
from ingest.model import AckStatistics, Decoded, Envelope, Reading, SparkplugStatistics
from ingest.observability.collector import Snapshot
from ingest.observability.health import CommitProgress, assess_readiness
from ingest.observability.merge import merge_expositions
from ingest.observability.service import Observability
from tests.unit.observability.support import collect, samples, snapshot, value


def test_collector_reads_every_stage() -> None:
    found = collect(snapshot())
    expected = {
        "ingest_messages_received_total": 1200,
        "ingest_messages_acknowledged_total": 1150,
        "ingest_messages_ack_lost_total": 10,
        "ingest_readings_written_total": 5000,
        "ingest_readings_duplicates_total": 25,
        "ingest_fields_skipped_total": 1100,
        "ingest_batches_total": 12,
        "ingest_broker_connects_total": 3,
        "ingest_channel_depth": 30,
        "ingest_channel_capacity": 2000,
        "ingest_messages_unacknowledged": 40,
        "ingest_inflight_window": 20,
        "ingest_broker_connected": 1,
        "ingest_broker_subscribed": 1,
        "ingest_database_connected": 1,
        "ingest_last_commit_timestamp_seconds": 1000.0,
    }
    for name, v in expected.items():
        assert value(found, name) == v, name
    assert value(found, "ingest_dead_letters_total", reason="not_json") == 5
    assert value(found, "ingest_dead_letters_total", reason="rejected_by_database") == 2
    assert value(found, "ingest_dead_letters_total", reason="bad_ts") == 0  # known, zero
    assert value(found, "ingest_write_retries_total", **{"class": "transient"}) == 4
    assert value(found, "ingest_write_retries_total", **{"class": "row"}) == 0
    assert value(found, "ingest_broker_disconnects_total", cause="timeout") == 1
    assert value(found, "ingest_broker_disconnects_total", cause="refused") == 0
    assert value(found, "ingest_batches_cut_total", cause="window") == 3
    assert ("ingest_build_info", frozenset()) not in found  # it has a version label


def test_collector_before_the_pipeline_exists_reports_only_build_info() -> None:
    found = collect(None)
    assert {name for name, _ in found} == {"ingest_build_info"}


def test_connection_state_gauges() -> None:
    found = collect(snapshot(subscribed=False, db_connected=False, last_commit_at=None))
    assert value(found, "ingest_broker_connected") == 0
    assert value(found, "ingest_broker_subscribed") == 0
    assert value(found, "ingest_database_connected") == 0
    assert not any(name == "ingest_last_commit_timestamp_seconds" for name, _ in found)


def test_worker_label_on_every_family() -> None:
    obs = Observability(host="127.0.0.1", port=0, ready_max_lag=30, worker="3")
    obs.record_commit([], WriteResult(inserted=5), 0.01, 1000.0)
    found = samples(obs.exposition())
    ingest = [labels for name, labels in found if name.startswith("ingest_")]
    assert ingest and all(("worker", "3") in labels for labels in ingest)


def _delivery(received: datetime, device_ts: datetime | None) -> Delivery:
    result: Decoded | DecodeError
    if device_ts is None:
        result = DecodeError("not_json", "not JSON")
    else:
        result = Decoded([Reading("dev-1", "t", device_ts, 1.0)], skipped=0)
    return Delivery(Envelope("devices/dev-1/telemetry", b"{}", received, result), None, 1, 1)  # type: ignore[arg-type]


def test_histograms_observed_once_per_batch_with_first_and_last_message() -> None:
    obs = Observability(host="127.0.0.1", port=0, ready_max_lag=30, process_metrics=False)
    commit = datetime(2024, 1, 1, 12, 0, 10, tzinfo=UTC)
    batch = [
        _delivery(commit - timedelta(seconds=2), commit - timedelta(seconds=60)),
        _delivery(commit - timedelta(seconds=1.5), None),  # middle: not sampled
        _delivery(commit - timedelta(seconds=1), commit + timedelta(seconds=5)),  # clock ahead
    ]
    obs.record_commit(batch, WriteResult(inserted=2, dead_letters=1), 0.04, commit.timestamp())
    found = samples(obs.exposition())
    assert value(found, "ingest_batch_size_rows_count") == 1
    assert value(found, "ingest_batch_size_rows_sum") == 3
    assert value(found, "ingest_batch_commit_duration_seconds_sum") == 0.04
    assert value(found, "ingest_commit_lag_seconds_count") == 2
    assert abs(value(found, "ingest_commit_lag_seconds_sum") - 3.0) < 1e-6
    assert value(found, "ingest_commit_lag_seconds_bucket", le="1.0") == 1
    assert value(found, "ingest_device_lag_seconds_count") == 2
    assert abs(value(found, "ingest_device_lag_seconds_sum") - 60.0) < 1e-6  # 60 + max(0, -5)


def test_readiness_verdicts() -> None:
    now = 1000.5

    def verdict(snap: Snapshot | None, **kw: object) -> object:
        args: dict[str, object] = {
            "now": now,
            "monotonic": 50.0,
            "stalled_for": 0.0,
            "max_lag": 30.0,
            "database_reachable": None,
        }
        args.update(kw)
        return assess_readiness(snap, **args)  # type: ignore[arg-type]

    ok = verdict(snapshot())
    assert ok is not None and ok.ready and ok.lag == 0.2  # type: ignore[attr-defined]
    starting = verdict(None)
    assert starting is not None and not starting.ready  # type: ignore[attr-defined]
    assert "starting" in starting.reason  # type: ignore[attr-defined]
    unsub = verdict(snapshot(subscribed=False))
    assert unsub is not None and "not subscribed" in unsub.reason  # type: ignore[attr-defined]
    # No recent write: a ping decides.
    assert verdict(snapshot(last_commit_at=900.0)) is None
    down = verdict(
        snapshot(db_connected=False),
        database_reachable=False,
        database_error="ConnectionRefusedError",
    )
    assert down is not None and not down.ready  # type: ignore[attr-defined]
    assert down.reason == "database unreachable: ConnectionRefusedError"  # type: ignore[attr-defined]
    idle = verdict(snapshot(outstanding=0, last_commit_at=None), database_reachable=True)
    assert idle is not None and idle.ready  # type: ignore[attr-defined]
    lagging = verdict(snapshot(last_commit_lag=31.0))
    assert lagging is not None and not lagging.ready  # type: ignore[attr-defined]
    assert "lag 31.0s" in lagging.reason  # type: ignore[attr-defined]
    stalled = verdict(snapshot(), stalled_for=45.0)
    assert stalled is not None and not stalled.ready  # type: ignore[attr-defined]
    # An old large lag does not count once nothing waits.
    assert verdict(snapshot(outstanding=0, last_commit_lag=99.0)).ready  # type: ignore[attr-defined]


def test_commit_progress_measures_stalls_only_while_messages_wait() -> None:
    progress = CommitProgress()

    def ack(outstanding: int, acked: int) -> AckStatistics:
        return AckStatistics(outstanding, acked, 0, 0)

    progress.observe(ack(0, 0), 0.0)
    assert progress.stalled_for(3.0) == 0.0
    progress.observe(ack(5, 0), 1.0)  # messages wait and nothing was released since 0.0
    assert progress.stalled_for(3.0) == 2.0
    progress.observe(ack(5, 0), 1.5)
    assert progress.stalled_for(3.0) == 2.0
    progress.observe(ack(5, 5), 2.0)  # a batch was released
    assert progress.stalled_for(3.0) == 0.0
    progress.observe(ack(5, 5), 2.5)
    progress.observe(ack(0, 10), 3.0)  # drained
    assert progress.stalled_for(10.0) == 0.0


def test_liveness_follows_the_heartbeat() -> None:
    obs = Observability(host="127.0.0.1", port=0, ready_max_lag=30, process_metrics=False)
    obs.beat(now=100.0)
    assert obs.liveness(now=101.0)[0]
    alive, body = obs.liveness(now=110.0)
    assert not alive and "stalled" in body["reason"]


def test_merge_expositions_groups_families_across_workers() -> None:
    texts = []
    for worker in ("0", "1"):
        obs = Observability(
            host="127.0.0.1", port=0, ready_max_lag=30, worker=worker, process_metrics=False
        )
        obs.record_commit([], WriteResult(inserted=10), 0.01, 1000.0)
        texts.append(obs.exposition().decode())
    merged = merge_expositions(texts).decode()
    assert merged.count("# TYPE ingest_batch_size_rows histogram") == 1
    found = samples(merged)
    for worker in ("0", "1"):
        assert value(found, "ingest_batch_size_rows_sum", worker=worker) == 10


def test_sparkplug_families_only_with_a_sparkplug_route() -> None:
    base = snapshot()
    assert not any(name.startswith("ingest_sparkplug") for name, _ in collect(base))
    stats = SparkplugStatistics(
        nodes=3, aliases=40, nodes_evicted=2, stale_deaths=1,
        rebirths_sent=5, rebirths_suppressed=7, rebirths_failed=0,
    )  # fmt: skip
    found = collect(
        dataclasses.replace(base, source=dataclasses.replace(base.source, sparkplug=stats))
    )
    assert value(found, "ingest_sparkplug_rebirth_requests_total", outcome="sent") == 5
    assert value(found, "ingest_sparkplug_rebirth_requests_total", outcome="suppressed") == 7
    assert value(found, "ingest_sparkplug_rebirth_requests_total", outcome="failed") == 0
    assert value(found, "ingest_sparkplug_stale_deaths_total") == 1
    assert value(found, "ingest_sparkplug_nodes_evicted_total") == 2
    assert value(found, "ingest_sparkplug_aliases") == 40
    assert value(found, "ingest_sparkplug_nodes") == 3
