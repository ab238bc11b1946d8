"""Restarting a worker set smaller: what the sessions of the removed workers strand, and how
fast ``ingest run`` retires them.

For each mode (``off``: ``INGEST_RETIRE_SURPLUS=false``, what a daemon without retiring does;
``on``: the default), on a throwaway Mosquitto (project config) and PostgreSQL: ``ingest run
--workers FROM`` starts (its sessions join the shared subscription) and stops; ``--messages``
are published while no worker runs (the broker spreads them over the FROM sessions); then
``ingest run --workers TO`` runs until every row is stored or nothing changed for ``--settle``
seconds. Reported: rows stored of those expected, messages stranded, and with retiring on the
seconds from the start to the surplus sessions ended at the broker, messages drained by the
retire and its rate, and what each removed session still holds afterwards.

    python -m benchmarks.sessions --messages 12000 --from-workers 8 --to-workers 4
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

from benchmarks._backlog import make_backlog, publish, queued_for
from benchmarks._daemon import IngestProcess
from benchmarks._env import open_environment, stored_rows

CLIENT_ID = "bench-sessions"
_DRAINED = re.compile(r"^retired \S+ at \S+: (\d+) messages drained in ([\d.]+)s")
_RETIRED = re.compile(r"surplus sessions retired: (\d+) of (\d+) .*, (\d+) messages drained")


def rows(dsn: str) -> int:
    return stored_rows(dsn)


def subscribed(p: IngestProcess) -> int:
    return sum(1 for r in list(p.records) if str(r.get("msg", "")).startswith("subscribed to"))


def find(p: IngestProcess, pattern: re.Pattern[str]) -> tuple[re.Match[str], float] | None:
    for r in list(p.records):
        if m := pattern.search(str(r.get("msg", ""))):
            return m, float(r.get("_wall") or _wall(r))
    return None


def _wall(record: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(record["ts"])).timestamp()


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def retire_figures(
    p: IngestProcess, done: tuple[re.Match[str], float], started: float
) -> dict[str, Any]:
    """What the retire of the surplus sessions logged: each removed session's drain (they run
    at once: messages and seconds to the last one acknowledged), and when it was all over."""
    m, at = done
    each = [
        (int(d[1]), float(d[2]))
        for r in list(p.records)
        if (d := _DRAINED.search(str(r.get("msg", ""))))
    ]
    seconds = max((t for _, t in each), default=0.0)
    return {
        "sessions_retired": int(m[1]),
        "retire_drained": int(m[3]),
        "retire_drain_seconds": seconds,
        "retire_msgs_per_s": round(sum(n for n, _ in each) / seconds) if seconds else 0,
        "seconds_until_broker_holds_nothing": round(at - started, 1),
    }


def one(mode: str, messages: int, before: int, after: int, settle: float) -> dict[str, Any]:
    with open_environment(inflight=10000, database_url=None) as env:
        dsn = env.fresh_database(mode)
        settings = {
            "INGEST_DATABASE_URL": dsn,
            "INGEST_MQTT_URL": env.mqtt_url,
            "INGEST_CLIENT_ID": CLIENT_ID,
            "INGEST_LOG_FORMAT": "json",
            "INGEST_STATS_INTERVAL": "1",
            "INGEST_METRICS_PORT": "0",
            "INGEST_RETIRE_SURPLUS": "true" if mode == "on" else "false",
        }
        first = IngestProcess(settings, args=["--workers", str(before)])
        try:
            wait(lambda: subscribed(first) >= before, 300, f"{before} workers subscribed")
        finally:
            first.terminate()
        backlog = make_backlog(
            messages=messages, devices=100, readings=5, samples=None, payload_bytes=150
        )
        publish(env.mqtt_url, backlog)
        started = time.time()
        second = IngestProcess(settings, args=["--workers", str(after)])
        try:
            last, changed = -1, time.monotonic()
            while time.monotonic() - changed < settle:
                now = rows(dsn)
                if now != last:
                    last, changed = now, time.monotonic()
                if now >= backlog.rows and (mode == "off" or find(second, _RETIRED)):
                    break
                time.sleep(0.5)
            stored = rows(dsn)
            done = find(second, _RETIRED)
        finally:
            second.terminate()
        for line in second.notable():
            print(f"{mode}: {line}", file=sys.stderr)
        surplus = [f"{CLIENT_ID}-{i}" for i in range(after, before)]
        left = {cid: queued_for(env.mqtt_url, cid, "3.1.1") for cid in surplus}
        out: dict[str, Any] = {
            "mode": mode,
            "messages": messages,
            "rows_expected": backlog.rows,
            "rows_stored": stored,
            "messages_stranded": (backlog.rows - stored) // 5,
            "left_in_removed_sessions": left,
        }
        if done is not None:
            out |= retire_figures(second, done, started)
        env.drop_databases()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=12000)
    parser.add_argument("--from-workers", type=int, default=8)
    parser.add_argument("--to-workers", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--settle", type=float, default=20.0, help="seconds without a new row")
    args = parser.parse_args()
    for mode in args.modes:
        result = one(mode, args.messages, args.from_workers, args.to_workers, args.settle)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
