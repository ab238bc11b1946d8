"""Scaling of ``ingest run --workers N`` on one pre-queued backlog: does throughput follow N?

For each N (default 1, 2, 4): a throwaway Mosquitto (project config) and Postgres cluster
(durable), N persistent sessions registered in one shared subscription group
(``$share/<client_id>/devices/+/telemetry``, client ids ``<client_id>-<i>``, as the workers
use), ``--messages`` published (the broker spreads them over the sessions), then
``ingest run --workers N`` drains them: seconds from start to all rows committed, messages/s,
rows/s, peak RSS per worker, CPU of the workers, the broker and Postgres. With ``--tls`` the
workers drain over a TLS listener of the broker (``mqtts://``, verified against a throwaway
CA); the backlog is still published over the plain one.

With ``--brokers K`` (several values: each one, times each ``--workers``): K throwaway
Mosquitto instances, the backlog's devices sharded over them (device ``d`` on broker
``d mod K``), the sessions registered as the daemon's worker sets name them
(``<client_id>-b<k>-<i>``), and ``ingest run`` given all K URLs with ``--workers N`` per broker.

    python -m benchmarks.scaling --messages 200000 --workers 1 2 4 [--tls]
    python -m benchmarks.scaling --messages 20000 --brokers 1 2 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from benchmarks._backlog import Backlog, broker_address, make_backlog, publish
from benchmarks._daemon import IngestProcess
from benchmarks._env import open_environment, stored_rows
from benchmarks._procstat import CpuSnapshot, descendants, peak_rss_mb
from ingest.runtime.supervisor import worker_client_id

CLIENT_ID = "bench-scale"


def register_shared(url: str, workers: int, broker_index: int | None = None) -> None:
    """The sessions ``ingest run`` will resume: its client ids (``broker_index``: the broker's
    position when there are several) in the shared group, or the one plain session."""
    broker = broker_address(url)
    shared = workers > 1 or broker_index is not None
    for i in range(workers):
        cid = worker_client_id(CLIENT_ID, i, broker_index) if shared else CLIENT_ID
        topic = f"$share/{CLIENT_ID}/devices/+/telemetry" if shared else "devices/+/telemetry"
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
    return stored_rows(dsn)


def shard(backlog: Backlog, brokers: int) -> list[Backlog]:
    """The backlog's devices dealt over ``brokers``: device ``d`` (in the backlog's order) to
    broker ``d mod brokers``, as ``simulate --mqtt-url`` repeated deals them."""
    parts: list[dict[str, list[bytes]]] = [{} for _ in range(brokers)]
    for d, (topic, payloads) in enumerate(backlog.lines.items()):
        parts[d % brokers][topic] = payloads
    per_message = backlog.rows // max(backlog.messages, 1)
    out = []
    for part in parts:
        messages = sum(len(v) for v in part.values())
        out.append(
            Backlog(
                lines=part,
                messages=messages,
                rows=messages * per_message,
                mean_payload_bytes=backlog.mean_payload_bytes,
                topic_filter=backlog.topic_filter,
            )
        )
    return out


def _total(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 2) if len(known) == len(values) else None


def _broker_settings(env: Any, brokers: int, *, tls: bool) -> dict[str, str]:
    if brokers == 1:
        return dict(env.daemon_settings(tls=tls))
    return {"INGEST_MQTT_URL": ",".join(env.mqtt_urls)}


def one(workers: int, messages: int, *, tls: bool = False, brokers: int = 1) -> dict[str, Any]:
    if tls and brokers > 1:
        raise SystemExit("--tls measures one broker's TLS listener: use it with --brokers 1")
    with open_environment(inflight=10000, database_url=None, tls=tls, brokers=brokers) as env:
        dsn = env.fresh_database(f"b{brokers}w{workers}")
        backlog = make_backlog(
            messages=messages, devices=100, readings=5, samples=None, payload_bytes=150
        )
        for k, (url, part) in enumerate(zip(env.mqtt_urls, shard(backlog, brokers), strict=True)):
            register_shared(url, workers, k if brokers > 1 else None)
            publish(url, part)
        before = CpuSnapshot.take(env.pids())
        t0 = time.monotonic()
        daemon = IngestProcess(
            {
                "INGEST_DATABASE_URL": dsn,
                **_broker_settings(env, brokers, tls=tls),
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
            broker_cpu = [v for k, v in cpu.items() if k.startswith("broker")]
            procs = [p for p in descendants(daemon.pid) if p != daemon.pid] or [daemon.pid]
            rss = [peak_rss_mb(p, tree=False) or 0.0 for p in procs]
        finally:
            daemon.terminate()
        return {
            "brokers": brokers,
            "workers": workers,
            "transport": "mqtts" if tls else "mqtt",
            "messages": messages,
            "seconds": round(took, 2),
            "msgs_per_s": round(messages / took),
            "rows_per_s": round(backlog.rows / took),
            "peak_rss_mb_per_worker": max(rss),
            "broker_cpu_s": _total(broker_cpu),
            "postgres_cpu_s": cpu.get("postgres"),
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="workers (per broker)"
    )
    parser.add_argument(
        "--brokers",
        type=int,
        nargs="+",
        default=[1],
        help="Mosquitto instances the backlog's devices are sharded over (each value is run "
        "with each --workers)",
    )
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--tls", action="store_true", help="workers over a TLS listener (mqtts://, CA verified)"
    )
    args = parser.parse_args()
    results = []
    print(f"workers over {'mqtts (TLS listener)' if args.tls else 'mqtt'}")
    print(
        f"{'brokers':>7} {'workers':>7} {'seconds':>8} {'msgs/s':>8} {'rows/s':>9} "
        f"{'RSS/worker MB':>14} {'broker CPU s':>12} {'PG CPU s':>9}"
    )
    for k in args.brokers:
        for n in args.workers:
            r = one(n, args.messages, tls=args.tls, brokers=k)
            results.append(r)
            print(
                f"{k:>7} {n:>7} {r['seconds']:>8} {r['msgs_per_s']:>8} {r['rows_per_s']:>9} "
                f"{r['peak_rss_mb_per_worker']:>14} {r['broker_cpu_s']!s:>12} "
                f"{r['postgres_cpu_s']!s:>9}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
