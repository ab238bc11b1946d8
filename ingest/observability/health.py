"""Health verdicts: is the loop alive (``/healthz``), is the daemon ready (``/readyz``).

* liveness: a heartbeat task stamps the time every 0.5 s and a stamp older than 5 s (the loop
  was blocked) is not alive.
* readiness: subscribed to the broker, the database accepted a write in the last few seconds
  or answers a ping, and the receive-to-commit lag is under ``ready_max_lag``. The lag is that
  of the last batch, or, while messages wait and no batch commits, how long that has lasted (so
  a database that hangs shows up even before a batch completes); and the dashboard fold has not
  kept failing for longer than ``ready_max_lag`` (the stored readings are fine then, but
  ``latest_readings``, ``devices`` and the rollups stop following them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ingest.model import AckStatistics, DashboardStatistics

if TYPE_CHECKING:
    from ingest.observability.collector import Snapshot

__all__ = [
    "CommitProgress",
    "DatabasePing",
    "Readiness",
    "assess_readiness",
    "current_lag",
    "fold_failing_for",
]

HEARTBEAT_INTERVAL = 0.5
HEALTHY_HEARTBEAT_AGE = 5.0
RECENT_WRITE = 5.0  # seconds: a commit this recent proves the database accepts writes
PING_CACHE = 1.0
PING_TIMEOUT = 2.0
MAX_REASON_ERROR = 200  # characters of a fold's error quoted in a /readyz reason


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


def fold_failing_for(dashboard: DashboardStatistics | None, monotonic: float) -> float:
    """How long the dashboard folds have been failing in a row (0 while they succeed)."""
    if dashboard is None or dashboard.failing_since is None:
        return 0.0
    return max(0.0, monotonic - dashboard.failing_since)


def assess_readiness(
    snapshot: Snapshot | None,
    *,
    now: float,
    monotonic: float,
    stalled_for: float,
    max_lag: float,
    database_reachable: bool | None,
    database_error: str = "",
) -> Readiness | None:
    """The verdict, or None when it depends on a database ping (``database_reachable`` None).

    ``now`` is a ``time.time()`` (as ``last_commit_at``), ``monotonic`` a ``time.monotonic()``
    (as the dashboard's ``failing_since``)."""
    if snapshot is None:
        return Readiness(False, "starting: waiting for the database")
    if not snapshot.source.subscribed:
        return Readiness(False, "not subscribed to the broker")
    if not _wrote_recently(snapshot, now):
        if database_reachable is None:
            return None
        if not database_reachable:
            return Readiness(False, f"database unreachable: {database_error}".rstrip(": "))
    lag = current_lag(snapshot, stalled_for)
    if lag >= max_lag:
        return Readiness(False, f"receive-to-commit lag {lag:.1f}s is over {max_lag:g}s", lag=lag)
    failing = fold_failing_for(snapshot.dashboard, monotonic)
    if failing > max_lag and snapshot.dashboard is not None:
        return Readiness(False, _fold_reason(snapshot.dashboard, failing), lag=lag)
    return Readiness(True, "ok", lag=lag)


def _wrote_recently(snapshot: Snapshot, now: float) -> bool:
    return (
        snapshot.writer.connected
        and snapshot.last_commit_at is not None
        and now - snapshot.last_commit_at < RECENT_WRITE
    )


def _fold_reason(dashboard: DashboardStatistics, failing: float) -> str:
    error = (dashboard.last_error or "unknown error")[:MAX_REASON_ERROR]
    return (
        f"dashboard fold failing for {failing:.0f}s ({dashboard.fold_failures} failures, "
        f"{dashboard.pending_batches} batches pending): {error}"
    )


class Pingable(Protocol):
    async def ping(self) -> None: ...


class DatabasePing:
    """Whether the database answers: one ``SELECT 1`` at most every PING_CACHE seconds,
    however many probes ask, so readiness probes cannot flood the database."""

    def __init__(self) -> None:
        self._at = -PING_CACHE
        self.ok = False
        self.error = ""
        self._lock = anyio.Lock()

    async def refresh(self, database: Pingable) -> None:
        async with self._lock:
            if time.monotonic() - self._at < PING_CACHE:
                return
            ok, error = False, "ping timed out"
            with anyio.move_on_after(PING_TIMEOUT):
                try:
                    await database.ping()
                    ok, error = True, ""
                except Exception as exc:
                    # Only its type goes into the verdict: an error's text may carry the
                    # DSN's host or user, and /readyz answers anyone who can reach the port.
                    error = type(exc).__name__
            self._at = time.monotonic()
            self.ok, self.error = ok, error
