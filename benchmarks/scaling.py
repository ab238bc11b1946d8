"""Scaling of ``ingest run --workers N`` on one pre-queued backlog: does throughput follow N?

For each N (default 1, 2, 4): a throwaway Mosquitto (project config) and Postgres cluster
(durable), N persistent sessions registered in one shared subscription group
(``$share/<client_id>/devices/+/telemetry``, client ids ``<client_id>-<i>``, as the workers
use), ``--messages`` published (the broker spreads them over the sessions), then
``ingest run --workers N`` drains them: seconds from start to all rows committed, messages/s,
rows/s, peak RSS per worker, CPU of the workers, the broker and Postgres. With ``--tls`` the
workers drain over a TLS listener of the broker (``mqtts://``, verified against a throwaway
CA); the backlog is still published over the plain one.

    python -m benchmarks.scaling --messages 200000 --workers 1 2 4 [--tls]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho

from benchmarks._backlog import broker_address, make_backlog, publish
from benchmarks._daemon import IngestProcess
from benchmarks._env import fetchval, open_environment
from benchmarks._procstat import CpuSnapshot, descendants, peak_rss_mb

CLIENT_ID = "bench-scale"


def register_shared(url: str, workers: int) -> None:
    broker = broker_address(url)
    for i in range(workers):
        cid = f"{CLIENT_ID}-{i}" if workers > 1 else CLIENT_ID
        topic = f"$share/{CLIENT_ID}/devices/+/telemetry" if workers > 1 else "devices/+/telemetry"
        done = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)  # type: ignore[attr-defined]
        c.on_subscribe = lambda *_a, e=done: e.set()
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.subscribe(topic, 1)
        if not done.wait(10):
            raise RuntimeError(f"no SUBACK for {cid}")
        c.disconnect()
        c.loop_stop()


def rows(dsn: str) -> int:
    try:
        return int(fetchval(dsn, "SELECT count(*) FROM readings") or 0)
    except asyncpg.UndefinedTableError:  # the daemon has not migrated yet
        return 0


def one(workers: int, messages: int, *, tls: bool = False) -> dict[str, Any]:
    with open_environment(inflight=10000, database_url=None, tls=tls) as env:
        dsn = env.fresh_database(f"w{workers}")
        register_shared(env.mqtt_url, workers)
        backlog = make_backlog(
            messages=messages, devices=100, readings=5, samples=None, payload_bytes=150
        )
        publish(env.mqtt_url, backlog)
        before = CpuSnapshot.take(env.pids())
        t0 = time.monotonic()
        daemon = IngestProcess(
            {
                "INGEST_DATABASE_URL": dsn,
                **env.daemon_settings(tls=tls),
                "INGEST_CLIENT_ID": CLIENT_ID,
                "INGEST_METRICS_PORT": "0",
                "INGEST_LOG_FORMAT": "json",
                "INGEST_STATS_INTERVAL": "1",
            },
            args=["--workers", str(workers)],
        )
        try:
            while rows(dsn) < backlog.rows:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(daemon.excerpt())
                if time.monotonic() - t0 > 1800:
                    raise RuntimeError("timed out")
                time.sleep(0.2)
            took = time.monotonic() - t0
            cpu = CpuSnapshot.take(env.pids()).minus(before)
            procs = [p for p in descendants(daemon.pid) if p != daemon.pid] or [daemon.pid]
            rss = [peak_rss_mb(p, tree=False) or 0.0 for p in procs]
        finally:
            daemon.terminate()
        return {
            "workers": workers,
            "transport": "mqtts" if tls else "mqtt",
            "messages": messages,
            "seconds": round(took, 2),
            "msgs_per_s": round(messages / took),
            "rows_per_s": round(backlog.rows / took),
            "peak_rss_mb_per_worker": max(rss),
            "broker_cpu_s": cpu.get("broker"),
            "postgres_cpu_s": cpu.get("postgres"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--tls", action="store_true", help="workers over a TLS listener (mqtts://, CA verified)"
    )
    args = parser.parse_args()
    results = []
    print(f"workers over {'mqtts (TLS listener)' if args.tls else 'mqtt'}")
    print(f"{'workers':>7} {'seconds':>8} {'msgs/s':>8} {'rows/s':>9} {'RSS/worker MB':>14}")
    for n in args.workers:
        r = one(n, args.messages, tls=args.tls)
        results.append(r)
        print(
            f"{n:>7} {r['seconds']:>8} {r['msgs_per_s']:>8} {r['rows_per_s']:>9} "
            f"{r['peak_rss_mb_per_worker']:>14}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
