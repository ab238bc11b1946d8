"""Memory with a backlog at the broker: the daemon must stay bounded whatever waits upstream.

Two modes, each on its own throwaway Mosquitto (project config) and Postgres cluster:

* ``outage``: the daemon runs, the database goes away, ``--messages`` (default
  500,000) pile up at the broker; the daemon's RSS is sampled throughout. It must stay flat: the
  broker holds the backlog, the daemon holds at most its channel and the in-flight window. Then
  the database returns and the time to catch up is measured.
* ``prequeued``: ``--messages`` (default 1,000,000) wait at the broker before the
  daemon starts (``--workers N`` for several processes); peak RSS per worker while it drains.

    python -m benchmarks.backlog_memory --mode outage --messages 500000
    python -m benchmarks.backlog_memory --mode prequeued --messages 1000000 --workers 2

Figures go to stdout (and ``--json FILE``); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._backlog import make_backlog, publish, register_sessions
from benchmarks._daemon import IngestProcess
from benchmarks._env import fetch, stored_rows
from benchmarks._procstat import descendants
from ingest.devservers.throwaway import Mosquitto, PostgresCluster

CLIENT_ID = "bench-memory"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def workers_of(proc: IngestProcess, workers: int) -> list[int]:
    if workers == 1:
        return [proc.pid]
    return [p for p in descendants(proc.pid) if p != proc.pid]


class Sampler:
    """RSS of some processes every 0.25 s in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, float]] = []  # (t, max RSS over pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(0.25):
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - t0, max(rss_mb(p) for p in self.pids)))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> float:
        return round(max((s for _, s in self.samples), default=0.0), 1)


def rows(dsn: str) -> int:
    return stored_rows(dsn)


def wait_rows(dsn: str, target: int, timeout: float) -> float:
    t0 = time.monotonic()
    while rows(dsn) < target:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"only {rows(dsn)} of {target} rows after {timeout}s")
        time.sleep(0.5)
    return time.monotonic() - t0


def outage(args: argparse.Namespace) -> dict[str, Any]:
    with Mosquitto() as broker, PostgresCluster() as pg:
        dsn = pg.create_database("bench")
        daemon = IngestProcess(
            {
                "INGEST_DATABASE_URL": dsn,
                "INGEST_MQTT_URL": broker.url,
                "INGEST_CLIENT_ID": CLIENT_ID,
                "INGEST_METRICS_PORT": "0",
                "INGEST_LOG_FORMAT": "json",
                "INGEST_STATS_INTERVAL": "1",
                "INGEST_RETRY_MAX_DELAY": "2",
            }
        )
        try:
            daemon.subscribed.wait(30)
            warm = make_backlog(
                messages=20_000, devices=100, readings=5, samples=None, payload_bytes=150
            )
            publish(broker.url, warm)
            wait_rows(dsn, warm.rows, 120)
            time.sleep(2)
            steady = round(rss_mb(daemon.pid), 1)
            pg.stop()
            backlog = make_backlog(
                messages=args.messages, devices=100, readings=5, samples=None, payload_bytes=150
            )
            with Sampler([daemon.pid]) as during:
                published_in = publish(broker.url, backlog)
                time.sleep(5)
            pg.start()
            with Sampler([daemon.pid]) as drain:
                caught_up = wait_rows(dsn, warm.rows + backlog.rows, 1800)
            result = {
                "mode": "outage",
                "messages_during_outage": args.messages,
                "publish_seconds": round(published_in, 1),
                "rss_steady_mb": steady,
                "rss_peak_during_outage_mb": during.peak(),
                "rss_peak_during_catch_up_mb": drain.peak(),
                "daemon_vmhwm_mb": round(hwm_mb(daemon.pid), 1),
                "catch_up_seconds": round(caught_up, 1),
                "catch_up_msgs_per_s": round(args.messages / caught_up),
            }
        finally:
            daemon.terminate()
    return result


def prequeued(args: argparse.Namespace) -> dict[str, Any]:
    ids = [CLIENT_ID] if args.workers == 1 else [f"{CLIENT_ID}-{i}" for i in range(args.workers)]
    with Mosquitto() as broker, PostgresCluster() as pg:
        dsn = pg.create_database("bench")
        register_sessions(broker.url, ids, "3.1.1")
        if args.workers > 1:
            # Shared subscription sessions: the workers subscribe as $share/<group>/...; a plain
            # pre-registration would queue a full copy per worker. Let the workers register.
            raise SystemExit("prequeued with --workers > 1: use benchmarks.drain --ingest-args")
        backlog = make_backlog(
            messages=args.messages, devices=100, readings=5, samples=None, payload_bytes=150
        )
        published_in = publish(broker.url, backlog)
        t0 = time.monotonic()
        daemon = IngestProcess(
            {
                "INGEST_DATABASE_URL": dsn,
                "INGEST_MQTT_URL": broker.url,
                "INGEST_CLIENT_ID": CLIENT_ID,
                "INGEST_METRICS_PORT": "0",
                "INGEST_LOG_FORMAT": "json",
                "INGEST_STATS_INTERVAL": "1",
            }
        )
        try:
            daemon.subscribed.wait(30)
            with Sampler(workers_of(daemon, args.workers)) as s:
                took = wait_rows(dsn, backlog.rows, 3600)
            took = time.monotonic() - t0
            result = {
                "mode": "prequeued",
                "messages_waiting": args.messages,
                "publish_seconds": round(published_in, 1),
                "drain_seconds": round(took, 1),
                "msgs_per_s": round(args.messages / took),
                "rows_per_s": round(backlog.rows / took),
                "rss_peak_mb": s.peak(),
                "daemon_vmhwm_mb": round(hwm_mb(daemon.pid), 1),
                "rows": rows(dsn),
                "dead_letters": fetch(dsn, "SELECT count(*) FROM dead_letters")[0][0],
            }
        finally:
            daemon.terminate()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.backlog_memory", description=__doc__
    )
    parser.add_argument("--mode", choices=["outage", "prequeued"], default="outage")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.messages is None:
        args.messages = 500_000 if args.mode == "outage" else 1_000_000
    result = outage(args) if args.mode == "outage" else prequeued(args)
    for key, value in result.items():
        print(f"{key:32} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
