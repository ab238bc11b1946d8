"""The dashboard fold seen from outside: its counters, and /readyz once folds keep failing."""

from __future__ import annotations

from ingest.model import DashboardStatistics
from ingest.observability.collector import Snapshot
from ingest.observability.health import Readiness, assess_readiness, fold_failing_for
from ingest.observability.service import Observability
from tests.unit.observability.support import collect, snapshot, value

MAX_LAG = 30.0


OVERFLOW = "NumericValueOutOfRangeError: value out of range: overflow"


def failing(since: float | None, *, error: str = OVERFLOW) -> DashboardStatistics:
    return DashboardStatistics(
        folds=40,
        fold_failures=0 if since is None else 7,
        failing_since=since,
        set_aside=2,
        pending_batches=0 if since is None else 15,
        last_error=None if since is None else error,
    )


def verdict(dashboard: DashboardStatistics | None, monotonic: float) -> Readiness:
    found = assess_readiness(
        snapshot(dashboard=dashboard),
        now=1000.5,
        monotonic=monotonic,
        stalled_for=0.0,
        max_lag=MAX_LAG,
        database_reachable=True,
    )
    assert found is not None
    return found


def test_dashboard_counters_and_backlog_are_exposed() -> None:
    found = collect(snapshot(dashboard=failing(100.0)))
    assert value(found, "ingest_dashboard_folds_total") == 40
    assert value(found, "ingest_dashboard_fold_failures_total") == 7
    assert value(found, "ingest_dashboard_set_aside_total") == 2
    assert value(found, "ingest_dashboard_pending_batches") == 15


def test_no_dashboard_families_when_the_fold_is_not_reported() -> None:
    found = collect(snapshot(dashboard=None))
    assert not any(name.startswith("ingest_dashboard_") for name, _ in found)


def test_folds_failing_longer_than_the_bound_make_the_daemon_not_ready() -> None:
    late = verdict(failing(100.0), monotonic=100.0 + MAX_LAG + 1)
    assert not late.ready
    assert "dashboard fold failing for 31s" in late.reason
    assert "value out of range: overflow" in late.reason
    assert "15 batches pending" in late.reason


def test_folds_failing_within_the_bound_or_healthy_stay_ready() -> None:
    assert verdict(failing(100.0), monotonic=100.0 + MAX_LAG - 1).ready
    assert verdict(failing(None), monotonic=10_000.0).ready
    assert verdict(None, monotonic=10_000.0).ready


def test_a_long_error_is_cut_in_the_reason() -> None:
    late = verdict(failing(0.0, error="x" * 10_000), monotonic=1000.0)
    assert not late.ready and len(late.reason) < 400


def test_fold_failing_for() -> None:
    assert fold_failing_for(None, 50.0) == 0.0
    assert fold_failing_for(failing(None), 50.0) == 0.0
    assert fold_failing_for(failing(20.0), 50.0) == 30.0


class _Stage:
    # __slots__: the observability must not write into what it observes (it would fail here).
    __slots__ = ("_stats",)

    def __init__(self, stats: object) -> None:
        self._stats = stats

    def statistics(self) -> object:
        return self._stats


class _Pipeline(_Stage):
    __slots__ = ("acker", "batcher", "last_commit_at", "source")

    def __init__(self, snap: Snapshot) -> None:
        super().__init__(snap.pipeline)
        self.source = _Stage(snap.source)
        self.acker = _Stage(snap.acker)
        self.batcher = _Stage(snap.batcher)
        self.last_commit_at = snap.last_commit_at


def test_attach_reads_the_dashboard_statistics_at_scrape_time() -> None:
    obs = Observability(host="127.0.0.1", port=0, ready_max_lag=MAX_LAG, process_metrics=False)
    base = snapshot()
    current = [failing(None)]
    obs.attach(
        _Pipeline(base),  # type: ignore[arg-type]
        _Stage(base.writer),  # type: ignore[arg-type]
        dashboard=lambda: current[0],
    )
    assert obs.snapshot() == snapshot(dashboard=failing(None))
    current[0] = failing(5.0)
    assert obs.snapshot() == snapshot(dashboard=failing(5.0))
