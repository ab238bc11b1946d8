"""Latency benchmark: publish-to-commit delay at a fixed rate, the daemon running.

``python -m benchmarks.latency (--rate-total R | --max-rate M | --from-json drain.json) ...``

The simulator (``simulate --qos 1 --rate R/D --duration S``; a built-in paced publisher when
``simulate`` is not installed) publishes at a fixed total rate, by default half of the given
maximum. Every payload's ``ts`` is its publish time in epoch milliseconds. The latency of a
message is its commit time minus its ``ts``:

- commit time = ``pg_xact_commit_timestamp(xmin)`` of its rows when the server tracks commit
  timestamps (the throwaway cluster does), exact and without a trigger;
- otherwise ``inserted_at``, a column this benchmark adds to ``readings`` after migration
  (``DEFAULT clock_timestamp()``; the daemon's COPY names its columns, so the default fills
  it): the time the row was copied, a few milliseconds before its commit.

``--tls``: the daemon subscribes over a TLS listener of the broker (``mqtts://``, verified
against a throwaway CA); the publisher stays on the plain listener.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._daemon import DaemonFailure, IngestProcess, run_migrate, split_ingest_args
from benchmarks._env import fetch, open_environment
from benchmarks._procstat import CpuSnapshot, cpu_seconds, peak_rss_mb, run_measured

__all__ = ["main"]

_QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.latency",
        description="Publish at a fixed rate with `ingest run` running; report publish-to-"
        "commit latency percentiles.",
    )
    rate = p.add_argument_group("rate (one of)")
    rate.add_argument("--rate-total", type=float, help="messages per second, all devices")
    rate.add_argument(
        "--max-rate", type=float, help="measured maximum (messages/s); the rate is half of it"
    )
    rate.add_argument(
        "--from-json",
        type=Path,
        help="a `benchmarks.drain --json` file: its ingest messages/s median is the maximum",
    )
    p.add_argument("--devices", type=int, default=100, help="devices (default 100)")
    p.add_argument("--duration", type=float, default=30, help="seconds of publishing (30)")
    p.add_argument(
        "--warmup", type=float, default=3, help="seconds at the start left out of the figures"
    )
    p.add_argument(
        "--inflight", type=int, default=10000, help="broker max_inflight_messages (10000)"
    )
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    p.add_argument(
        "--tls",
        action="store_true",
        help="the daemon over a TLS listener (mqtts://, CA verified); publishing stays plain",
    )
    p.add_argument("--database-url", default=None, help="an existing server (fresh database)")
    p.add_argument("--no-durable", dest="durable", action="store_false")
    p.add_argument("--ingest-args", default="", help="as for benchmarks.drain")
    p.add_argument(
        "--publisher",
        choices=("auto", "simulate", "builtin"),
        default="auto",
        help="auto: `simulate` when it runs, else the built-in paced publisher",
    )
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    p.add_argument("--timeout", type=float, default=120, help="seconds to catch up after")
    return p


def _rate(a: argparse.Namespace) -> tuple[float, str]:
    if a.rate_total:
        return a.rate_total, "--rate-total"
    if a.max_rate:
        return a.max_rate / 2, f"half of --max-rate {a.max_rate:,.0f}"
    if a.from_json:
        data = json.loads(a.from_json.read_text())
        # A `drain --tls` file names its daemon figures ingest_tls.
        ingest = data["summary"].get("ingest") or data["summary"]["ingest_tls"]
        best = ingest["msgs_per_s"]["median"]
        return best / 2, f"half of the ingest median {best:,.0f} msg/s in {a.from_json}"
    raise SystemExit("latency: give --rate-total, --max-rate or --from-json (see --help)")


def _simulate_works() -> bool:
    exe = shutil.which("simulate")
    if exe is None:
        return False
    r = subprocess.run([exe, "--help"], capture_output=True, check=False)
    return r.returncode == 0


def _publisher_command(a: argparse.Namespace, url: str, rate: float) -> tuple[list[str], str]:
    use_sim = a.publisher == "simulate" or (a.publisher == "auto" and _simulate_works())
    if use_sim:
        exe = shutil.which("simulate") or "simulate"
        return [
            *(exe, "--mqtt-url", url, "--devices", str(a.devices)),
            *("--rate", f"{rate / a.devices:.6g}", "--qos", "1"),
            *("--duration", f"{a.duration:g}", "--report", "json", "--quiet"),
        ], "simulate"
    return [
        *(sys.executable, "-m", "benchmarks._pacer", "--url", url),
        *("--devices", str(a.devices), "--rate-total", f"{rate:g}"),
        *("--duration", f"{a.duration:g}"),
    ], "built-in paced publisher" + ("" if a.publisher == "builtin" else " (no simulate)")


def _percentiles(dsn: str, column: str, since: datetime) -> dict[str, Any]:
    """Per message (its rows share device and ts, and one transaction) latency in ms."""
    rows = fetch(
        dsn,
        f"""
        WITH m AS (
            SELECT extract(epoch FROM max({column}) - ts) * 1000 AS ms
            FROM readings WHERE ts >= $1 GROUP BY device_id, ts
        )
        SELECT count(*), percentile_cont($2::float8[]) WITHIN GROUP (ORDER BY ms),
               avg(ms), min(ms), max(ms)
        FROM m
        """,
        since,
        list(_QUANTILES),
    )
    count, quantiles, mean, low, high = rows[0]
    out: dict[str, Any] = {"messages": count}
    for q, v in zip(_QUANTILES, quantiles or [None] * len(_QUANTILES), strict=True):
        out[f"p{q * 100:g}_ms"] = None if v is None else round(v, 1)
    out |= {
        "mean_ms": None if mean is None else round(float(mean), 1),
        "min_ms": None if low is None else round(float(low), 1),
        "max_ms": None if high is None else round(float(high), 1),
    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    rate, rate_source = _rate(a)
    args, extra_env = split_ingest_args(a.ingest_args)
    result: dict[str, Any] = {
        "rate_total": rate,
        "rate_source": rate_source,
        "devices": a.devices,
        "duration_s": a.duration,
        "warmup_s": a.warmup,
        "inflight": a.inflight,
        "protocol": a.protocol,
        "tls": a.tls,
        "ingest_args": a.ingest_args,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "ok": False,
    }
    with open_environment(
        inflight=a.inflight, database_url=a.database_url, durable=a.durable, tls=a.tls
    ) as env:
        result["transport"] = env.transport_text((a.tls,), plain_use="publisher")
        dsn = env.fresh_database("latency")
        run_migrate(dsn)
        fetch(
            dsn,
            "ALTER TABLE readings ADD COLUMN inserted_at timestamptz DEFAULT clock_timestamp()",
        )
        start = datetime.now(UTC)
        daemon = IngestProcess(
            {
                "INGEST_DATABASE_URL": dsn,
                **env.daemon_settings(tls=a.tls),
                "INGEST_CLIENT_ID": f"bench-latency-{int(time.time())}",
                "INGEST_MQTT_PROTOCOL": a.protocol,
                "INGEST_METRICS_PORT": "0",
                "INGEST_LOG_FORMAT": "json",
                "INGEST_STATS_INTERVAL": "0.5",
            },
            args=args,
            extra_env=extra_env,
        )
        try:
            if not daemon.subscribed.wait(60):
                raise DaemonFailure("ingest run did not subscribe within 60s", daemon.excerpt())
            command, publisher = _publisher_command(a, env.mqtt_url, rate)
            result["publisher"] = publisher
            print(
                f"latency: {rate:,.0f} msg/s ({rate_source}) over {a.devices} devices for "
                f"{a.duration:g}s with {publisher}",
                file=sys.stderr,
            )
            before = CpuSnapshot.take(env.pids())
            daemon_before = cpu_seconds(daemon.pid) or 0.0
            start = datetime.now(UTC)
            pub = run_measured(command, timeout=a.duration + 120)
            report = json.loads(pub.stdout.strip().splitlines()[-1]) if pub.stdout.strip() else {}
            result["publish"] = report
            result["publisher_cpu_s"] = pub.cpu_seconds
            if pub.returncode != 0:
                result["error"] = f"publisher exited {pub.returncode}: {pub.stderr[-1500:]}"
            published = int(report.get("published", 0))
            daemon.wait_for(
                lambda s: int(s.get("received", 0)) >= published and int(s.get("unacked", 1)) == 0,
                timeout=a.timeout,
                stall=a.timeout,
                what=f"catching up with {published} published messages",
            )
            result["daemon_cpu_s"] = round((cpu_seconds(daemon.pid) or 0.0) - daemon_before, 2)
            result["daemon_peak_rss_mb"] = peak_rss_mb(daemon.pid)
            servers = CpuSnapshot.take(env.pids()).minus(before)
            result["broker_cpu_s"] = servers["broker"]
            result["postgres_cpu_s"] = servers["postgres"]
        except DaemonFailure as exc:
            result["error"] = exc.what
            result["log_excerpt"] = exc.excerpt
        finally:
            result["exit_status"] = daemon.terminate()
            result["warnings"] = daemon.notable()
        if "log_excerpt" not in result:
            since = datetime.fromtimestamp(start.timestamp() + a.warmup, UTC)
            column = "pg_xact_commit_timestamp(xmin)" if env.commit_timestamps else "inserted_at"
            result["method"] = column
            result["latency"] = _percentiles(dsn, column, since)
            if env.commit_timestamps:
                result["latency_inserted_at"] = _percentiles(dsn, "inserted_at", since)
            result["ok"] = "error" not in result
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(render(result))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result["ok"] else 1


def render(r: dict[str, Any]) -> str:
    lines = [
        f"latency benchmark: {r['rate_total']:,.0f} msg/s target ({r['rate_source']}), "
        f"{r['devices']} devices, {r['duration_s']:g}s, broker max_inflight_messages "
        f"{r['inflight']}, MQTT {r['protocol']}, publisher: {r.get('publisher', '-')}",
        f"daemon over {r.get('transport', '-')}",
    ]
    pub = r.get("publish") or {}
    if pub:
        lines.append(
            f"published {pub.get('published', 0):,} ({pub.get('failed', 0)} failed) in "
            f"{pub.get('seconds', 0):.1f}s = {pub.get('rate', 0):,.0f} msg/s achieved"
        )
    lat = r.get("latency")
    if lat:
        lines.append(
            f"publish -> commit ({r['method']}), {lat['messages']:,} messages after the first "
            f"{r['warmup_s']:g}s: p50 {lat['p50_ms']} ms, p90 {lat['p90_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, p99.9 {lat['p99.9_ms']} ms, max {lat['max_ms']} ms, "
            f"mean {lat['mean_ms']} ms"
        )
    if r.get("latency_inserted_at"):
        li = r["latency_inserted_at"]
        lines.append(
            f"publish -> row copied (inserted_at): p50 {li['p50_ms']} ms, p99 {li['p99_ms']} ms"
        )
    lines.append(
        "CPU seconds during the run: daemon {}, broker {}, Postgres {}, publisher {}; "
        "daemon peak RSS {} MiB".format(
            r.get("daemon_cpu_s", "-"),
            r.get("broker_cpu_s", "-"),
            r.get("postgres_cpu_s", "-"),
            r.get("publisher_cpu_s", "-"),
            r.get("daemon_peak_rss_mb", "-"),
        )
    )
    lines.append(
        f"load average (1, 5, 15 min) before {r['load_average_before']}, "
        f"after {r.get('load_average_after')}"
    )
    if r.get("error"):
        lines.append(f"FAILED: {r['error']}")
    if r.get("log_excerpt"):
        lines.append(r["log_excerpt"])
    for w in dict.fromkeys(r.get("warnings") or []):
        lines.append(f"ingest logged: {w}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
