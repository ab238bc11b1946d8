"""Drain benchmark: the same pre-queued backlog, drained by three consumers one after the other.

``python -m benchmarks.drain [--messages N] [--inflight W] [--repeat R] [--json FILE] ...``

1. **bare**: a bare aiomqtt client, manual acks, nothing else (the ceiling of one worker);
2. **naive**: paho + one autocommitted INSERT per message, on a subset, extrapolated;
3. **ingest**: ``ingest run`` end to end, from process start to the last row committed with
   every message acknowledged.

``--format value`` queues the same samples one value per topic (``devices/<id>/<metric>``,
``{"ts": ..., "value": ...}``, one row a message) and gives ``ingest run`` a route table for them
(``--config`` with one ``value`` route); the naive baseline reads only JSON and is skipped.
``--format senml`` / ``senml-cbor`` queue the JSON backlog's samples as one SenML pack each (JSON
or CBOR) through a ``senml`` route; ``--format sparkplug`` as Sparkplug B DDATA by alias under
edge nodes of ten devices, the NBIRTHs and DBIRTHs published first, through a ``sparkplug``
route (``benchmarks/_backlog.py``). Those too need ``--skip naive``.

``--tls`` drains over a TLS listener of the same broker (``mqtts://``, certificate and host
name verified against a throwaway CA); ``--transport both`` measures each consumer over both
listeners on the same backlog, alternating which goes first, and prints mqtts / mqtt. The
backlog is always published over the plain listener.

See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks._backlog import (
    FORMATS,
    ROUTES,
    Backlog,
    make_backlog,
    publish,
    queued_for,
    register_sessions,
    wipe_sessions,
)
from benchmarks._daemon import DaemonFailure, IngestProcess, run_migrate, split_ingest_args
from benchmarks._env import Environment, fetch, fetchval, open_environment
from benchmarks._procstat import CpuSnapshot, cpu_seconds, peak_rss_mb, run_measured

__all__ = ["main"]

CONSUMERS = ("bare", "naive", "ingest")
TRANSPORTS = {"mqtt": (False,), "mqtts": (True,), "both": (False, True)}
Result = dict[str, Any]


def _key(consumer: str, tls: bool) -> str:
    """The name of one measurement: ``ingest`` over plain MQTT, ``ingest_tls`` over TLS."""
    return f"{consumer}_tls" if tls else consumer


def _keys(consumers: Sequence[str], transport: str) -> list[str]:
    return [_key(c, tls) for c in consumers for tls in TRANSPORTS[transport]]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.drain",
        description="Drain a pre-queued QoS 1 backlog with a bare aiomqtt client, a naive "
        "paho+INSERT script and `ingest run`; print them side by side.",
    )
    p.add_argument("--messages", type=int, default=100_000, help="backlog size (default 100000)")
    p.add_argument("--devices", type=int, default=100, help="device topics (default 100)")
    p.add_argument(
        "--readings", type=int, default=5, help="numeric fields per sample, seq included (5)"
    )
    p.add_argument(
        "--samples", type=int, default=None, help="send JSON arrays of this many samples"
    )
    p.add_argument(
        "--payload-bytes", type=int, default=150, help="pad single-sample payloads to ~this"
    )
    p.add_argument(
        "--inflight", type=int, default=10000, help="broker max_inflight_messages (10000)"
    )
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json: a JSON sample per message on devices/<id>/telemetry (the default route); "
        "value: each reading its own message on devices/<id>/<metric>, drained through a "
        "`value` route (--config); senml, senml-cbor: each sample a SenML pack (JSON, CBOR) on "
        "devices/<id>/telemetry through a `senml` route; sparkplug: each sample a DDATA by "
        "alias, births first, through a `sparkplug` route. All but json need --skip naive",
    )
    p.add_argument(
        "--transport",
        choices=tuple(TRANSPORTS),
        default="mqtt",
        help="how the consumers reach the broker: mqtt (plain), mqtts (TLS listener, CA "
        "verified) or both, alternately on the same backlog (default mqtt)",
    )
    p.add_argument(
        "--tls",
        dest="transport",
        action="store_const",
        const="mqtts",
        help="same as --transport mqtts; the backlog is still published over plain MQTT",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="use this PostgreSQL server (a fresh database per run) instead of a throwaway one",
    )
    p.add_argument(
        "--no-durable",
        dest="durable",
        action="store_false",
        help="throwaway cluster with fsync and full_page_writes off (the tests' setting)",
    )
    p.add_argument(
        "--pg-tuned",
        action="store_true",
        help="the throwaway cluster with README's PostgreSQL settings for ingest",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs; medians with min and max")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    p.add_argument(
        "--naive-messages", type=int, default=5000, help="subset for the naive baseline (5000)"
    )
    p.add_argument(
        "--ingest-args",
        default="",
        help="extra words for `ingest run`; leading NAME=VALUE words go to its environment, "
        'e.g. "INGEST_BATCH_MAX_ROWS=10000 --workers 2"',
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=0.1,
        help="daemon stats line interval (how the harness watches it; default 0.1 s)",
    )
    p.add_argument(
        "--publishers", type=int, default=16, help="mosquitto_pub processes at once (16)"
    )
    p.add_argument(
        "--bare-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop of the bare client (auto: the daemon's, i.e. asyncio unless "
        "--ingest-args sets INGEST_UVLOOP=1)",
    )
    p.add_argument(
        "--skip", default="", help=f"comma-separated consumers to skip: {', '.join(CONSUMERS)}"
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per consumer at most (300)")
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=60,
        help="seconds without progress before the daemon counts as stalled (60)",
    )
    return p


# --- the three consumers --------------------------------------------------------------------


def _storage(dsn: str) -> str:
    """The table that holds the rows: ``points`` (behind the ``readings`` view), or
    ``readings`` itself in a database of the earlier schema."""
    return "points" if fetchval(dsn, "SELECT to_regclass('points')") else "readings"


def _rate(count: int, seconds: float | None) -> float | None:
    return None if not seconds or seconds <= 0 else round(count / seconds, 1)


def _finish(r: Result, *, messages: int, rows: int) -> Result:
    r["messages"] = messages
    r["rows"] = rows
    r["msgs_per_s"] = _rate(messages, r.get("seconds"))
    r["rows_per_s"] = _rate(r["rows"], r.get("seconds"))
    first = r.get("first_message_s")
    steady = None if first is None or r.get("seconds") is None else r["seconds"] - first
    r["steady_msgs_per_s"] = _rate(messages, steady)
    return r


def measure_bare(
    env: Environment,
    a: argparse.Namespace,
    client_id: str,
    backlog: Backlog,
    *,
    loop: str,
    tls: bool,
) -> Result:
    before = CpuSnapshot.take(env.pids())
    child = run_measured(
        [
            *(sys.executable, "-m", "benchmarks._bare", *env.client_args(tls=tls)),
            *("--client-id", client_id, "--messages", str(backlog.messages)),
            *("--protocol", a.protocol, "--loop", loop),
        ],
        timeout=a.timeout,
    )
    servers = CpuSnapshot.take(env.pids()).minus(before)
    r: Result = {"ok": False, "loop": loop, "cpu_s": child.cpu_seconds}
    r["broker_cpu_s"] = servers["broker"]
    if child.returncode != 0 or child.timed_out:
        r["error"] = (
            f"bare client exited {child.returncode}"
            f"{' (timed out)' if child.timed_out else ''}: {child.stderr[-1500:]}"
        )
        return r
    out = json.loads(child.stdout.strip().splitlines()[-1])
    r["peak_rss_mb"] = out.get("peak_rss_mb")
    r["seconds"] = round(out["done"] - child.started, 3)
    r["first_message_s"] = round(out["first"] - child.started, 3)
    left = queued_for(env.mqtt_url, client_id, a.protocol)
    r["left_at_broker"] = left
    r["ok"] = out["received"] == backlog.messages and left == 0
    r["verified"] = f"received {out['received']}, broker has {left} left for the session"
    return _finish(r, messages=backlog.messages, rows=backlog.rows)


def measure_naive(
    env: Environment, a: argparse.Namespace, client_id: str, backlog: Backlog, *, tls: bool
) -> Result:
    subset = min(a.naive_messages, backlog.messages)
    per_message = backlog.rows // backlog.messages
    dsn = env.fresh_database("naive")
    run_migrate(dsn)
    before = CpuSnapshot.take(env.pids())
    child = run_measured(
        [
            *(sys.executable, "-m", "benchmarks._naive", *env.client_args(tls=tls)),
            *("--dsn", dsn),
            *("--client-id", client_id, "--messages", str(subset), "--protocol", a.protocol),
        ],
        timeout=a.timeout,
    )
    servers = CpuSnapshot.take(env.pids()).minus(before)
    r: Result = {"ok": False, "subset": subset, "cpu_s": child.cpu_seconds}
    r["broker_cpu_s"] = servers["broker"]
    r["postgres_cpu_s"] = servers["postgres"]
    if child.returncode != 0 or child.timed_out:
        r["error"] = f"naive client exited {child.returncode}: {child.stderr[-1500:]}"
        return r
    out = json.loads(child.stdout.strip().splitlines()[-1])
    r["peak_rss_mb"] = out.get("peak_rss_mb")
    r["seconds"] = round(out["done"] - child.started, 3)
    r["first_message_s"] = round(out["first"] - child.started, 3)
    rows = fetchval(dsn, "SELECT count(*) FROM readings")
    r["ok"] = rows == subset * per_message
    r["verified"] = f"{rows} rows for {subset} messages"
    return _finish(r, messages=subset, rows=subset * per_message)


def measure_ingest(
    env: Environment, a: argparse.Namespace, client_id: str, backlog: Backlog, *, tls: bool
) -> Result:
    args, extra_env = split_ingest_args(a.ingest_args)
    if a.routes_file is not None:
        args = ["--config", str(a.routes_file), *args]
    dsn = env.fresh_database("ingest")
    settings = {
        "INGEST_DATABASE_URL": dsn,
        **env.daemon_settings(tls=tls),
        "INGEST_CLIENT_ID": client_id,
        "INGEST_MQTT_PROTOCOL": a.protocol,
        "INGEST_METRICS_PORT": "0",
        "INGEST_LOG_FORMAT": "json",
        "INGEST_STATS_INTERVAL": str(a.stats_interval),
    }
    r: Result = {"ok": False, "args": args, "env": extra_env}
    before = CpuSnapshot.take(env.pids())
    daemon = IngestProcess(settings, args=args, extra_env=extra_env)
    r["command"] = " ".join(daemon.command)
    n, rows = backlog.messages, backlog.rows
    try:
        done = daemon.wait_for(
            lambda s: (
                int(s.get("received", 0)) >= n
                and int(s.get("rows", 0)) >= rows
                and int(s.get("unacked", -1)) == 0
            ),
            timeout=a.timeout,
            stall=a.stall_timeout,
            what=f"draining {n} messages",
        )
    except DaemonFailure as exc:
        daemon.terminate(timeout=15)
        r["error"] = exc.what
        r["log_excerpt"] = exc.excerpt
        r["warnings"] = daemon.notable()
        return r
    r["cpu_s"] = cpu_seconds(daemon.pid)
    r["peak_rss_mb"] = peak_rss_mb(daemon.pid)
    servers = CpuSnapshot.take(env.pids()).minus(before)
    r["broker_cpu_s"] = servers["broker"]
    r["postgres_cpu_s"] = servers["postgres"]
    r["seconds_stats"] = round(done["_wall"] - daemon.started, 3)
    if daemon.first_received_at is not None:
        r["first_message_s"] = round(daemon.first_received_at - daemon.started, 3)
    status = daemon.terminate()
    r["exit_status"] = status
    r["drained"] = daemon.drained
    r["warnings"] = daemon.notable()
    stored = fetchval(dsn, "SELECT count(*) FROM readings")
    dead = fetchval(dsn, "SELECT count(*) FROM dead_letters")
    r["seconds"] = r["seconds_stats"]
    r["timing"] = f"stats line (every {a.stats_interval}s)"
    if env.commit_timestamps:
        (first_commit, last_commit), *_ = fetch(
            dsn,
            "SELECT extract(epoch FROM min(pg_xact_commit_timestamp(xmin)))::float8,"
            " extract(epoch FROM max(pg_xact_commit_timestamp(xmin)))::float8"
            f" FROM {_storage(dsn)}",
        )
        if last_commit is not None:
            r["seconds"] = round(last_commit - daemon.started, 3)
            r["first_commit_s"] = round(first_commit - daemon.started, 3)
            r["timing"] = "last commit (track_commit_timestamp)"
    left = queued_for(env.mqtt_url, client_id, a.protocol)
    r["left_at_broker"] = left
    acked = (daemon.drained or {}).get("acknowledged")
    r["verified"] = (
        f"{stored} rows, {dead} dead letters, drained line: {acked} acknowledged, "
        f"exit {status}, broker has {left} left for the session"
    )
    r["ok"] = stored == rows and dead == 0 and acked == n and status == 0 and left == 0
    # Text values (the backlog's `fw`) are stored since storage v2: rows too, of the same work.
    texts = fetchval(dsn, "SELECT count(*) FROM text_readings") if _has_texts(dsn) else 0
    r["text_rows"] = texts
    r = _finish(r, messages=n, rows=rows)
    r["all_rows_per_s"] = _rate(rows + texts, r.get("seconds"))
    for key, cpu in (("consumer_us_per_row", "cpu_s"), ("postgres_us_per_row", "postgres_cpu_s")):
        if r.get(cpu) is not None:
            r[key] = round(r[cpu] * 1e6 / (rows + texts), 3)
    return r


def _has_texts(dsn: str) -> bool:
    return bool(fetchval(dsn, "SELECT to_regclass('text_readings')"))


# --- one run and the report -----------------------------------------------------------------


def one_run(
    env: Environment, a: argparse.Namespace, backlog: Backlog, index: int, loop: str
) -> Result:
    tag = uuid.uuid4().hex[:6]
    consumers = [c for c in CONSUMERS if c not in a.skip]
    ids = {k: f"bench-{k.replace('_', '-')}-{tag}" for k in _keys(consumers, a.transport)}
    register_sessions(env.mqtt_url, list(ids.values()), a.protocol, backlog.topic_filter)
    seconds = publish(env.mqtt_url, backlog, parallel=a.publishers)
    run: Result = {
        "repeat": index,
        "publish_s": round(seconds, 2),
        "publish_msgs_per_s": _rate(backlog.messages, seconds),
    }
    print(
        f"run {index + 1}/{a.repeat}: backlog of {backlog.messages} published in {seconds:.1f}s "
        f"({backlog.messages / seconds:,.0f} msg/s) for {len(ids)} sessions",
        file=sys.stderr,
    )
    measures: dict[str, Callable[[bool], Result]] = {
        "bare": lambda tls: measure_bare(
            env, a, ids[_key("bare", tls)], backlog, loop=loop, tls=tls
        ),
        "naive": lambda tls: measure_naive(env, a, ids[_key("naive", tls)], backlog, tls=tls),
        "ingest": lambda tls: measure_ingest(env, a, ids[_key("ingest", tls)], backlog, tls=tls),
    }
    # With both transports, every other run starts with TLS, so that neither of the two
    # always drains first (a warmer cache, a quieter moment).
    order = TRANSPORTS[a.transport][:: -1 if index % 2 else 1]
    for consumer in consumers:
        for tls in order:
            name = _key(consumer, tls)
            print(f"  measuring {name} ...", file=sys.stderr)
            run[name] = result = measures[consumer](tls)
            _say_if_failed(name, result)
    wipe_sessions(env.mqtt_url, list(ids.values()), a.protocol)
    run["ratios"] = _ratios(run)
    return run


def _say_if_failed(name: str, result: Result) -> None:
    if not result["ok"]:
        print(f"  {name}: NOT OK: {result.get('error') or result.get('verified')}", file=sys.stderr)
        if result.get("log_excerpt"):
            print(result["log_excerpt"], file=sys.stderr)


def _ratio(x: Any, y: Any, digits: int = 2) -> float | None:
    ok = isinstance(x, int | float) and isinstance(y, int | float) and y
    return round(x / y, digits) if ok else None


def _pair(run: Result, top: str, bottom: str, digits: int = 2) -> dict[str, float | None]:
    """``top_over_bottom`` on messages/s, and ``..._steady`` after the first message."""
    x, y = run.get(top, {}), run.get(bottom, {})
    return {
        f"{top}_over_{bottom}": _ratio(x.get("msgs_per_s"), y.get("msgs_per_s"), digits),
        f"{top}_over_{bottom}_steady": _ratio(
            x.get("steady_msgs_per_s"), y.get("steady_msgs_per_s"), digits
        ),
    }


def _ratios(run: Result) -> dict[str, float | None]:
    """ingest over the baselines on the same transport; each consumer's mqtts over mqtt."""
    out: dict[str, float | None] = {}
    for tls in (False, True):
        for other in ("bare", "naive"):
            out |= _pair(run, _key("ingest", tls), _key(other, tls))
    for consumer in CONSUMERS:
        # Three digits: the cost of TLS is a few per cent.
        out |= _pair(run, _key(consumer, True), consumer, digits=3)
    return out


def _spread(values: Sequence[Any]) -> dict[str, float] | None:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not nums:
        return None
    return {"median": statistics.median(nums), "min": min(nums), "max": max(nums), "n": len(nums)}


def _present(runs: Sequence[Result]) -> list[str]:
    """The measurements in these runs, in table order (each consumer: mqtt, then mqtts)."""
    every = [_key(c, tls) for c in CONSUMERS for tls in (False, True)]
    return [k for k in every if any(k in r for r in runs)]


def summarize(runs: Sequence[Result]) -> Result:
    out: Result = {}
    for name in _present(runs):
        ok = [r[name] for r in runs if r.get(name, {}).get("ok")]
        keys = {k for r in ok for k, v in r.items() if isinstance(v, int | float)}
        out[name] = {k: _spread([r.get(k) for r in ok]) for k in sorted(keys) if k != "ok"}
        out[name]["ok_runs"] = len(ok)
    out["ratios"] = {k: _spread([r["ratios"].get(k) for r in runs]) for k in _ratios({})}
    return out


_ROWS: list[tuple[str, str, str]] = [
    ("messages", "messages", "{:,.0f}"),
    ("seconds, process start -> done", "seconds", "{:.2f}"),
    ("first message after, s", "first_message_s", "{:.2f}"),
    ("messages/s", "msgs_per_s", "{:,.0f}"),
    ("rows/s", "rows_per_s", "{:,.0f}"),
    ("messages/s after first message", "steady_msgs_per_s", "{:,.0f}"),
    ("consumer CPU, s", "cpu_s", "{:.2f}"),
    ("consumer peak RSS, MiB", "peak_rss_mb", "{:.1f}"),
    ("broker CPU, s", "broker_cpu_s", "{:.2f}"),
    ("Postgres CPU, s", "postgres_cpu_s", "{:.2f}"),
    ("text rows stored (fw)", "text_rows", "{:,.0f}"),
    ("rows/s, text rows included", "all_rows_per_s", "{:,.0f}"),
    ("consumer CPU per stored row, us", "consumer_us_per_row", "{:.2f}"),
    ("Postgres CPU per stored row, us", "postgres_us_per_row", "{:.2f}"),
]
_TITLES = {
    "bare": "bare aiomqtt",
    "naive": "naive paho+INSERT",
    "ingest": "ingest run",
    "bare_tls": "bare aiomqtt, mqtts",
    "naive_tls": "naive paho+INSERT, mqtts",
    "ingest_tls": "ingest run, mqtts",
}


def _cell(spread: dict[str, float] | None, fmt: str) -> str:
    if spread is None:
        return "-"
    text = fmt.format(spread["median"])
    if spread["n"] > 1:
        text += f" ({fmt.format(spread['min'])}..{fmt.format(spread['max'])})"
    return text


def _ratio_lines(ratios: Result) -> list[str]:
    def both(name: str, fmt: str) -> str:
        steady = _cell(ratios.get(f"{name}_steady"), fmt)
        return f"{_cell(ratios.get(name), fmt)} (after first message: {steady})"

    lines = []
    for tls in (False, True):
        ing, bare, naive = (_key(c, tls) for c in ("ingest", "bare", "naive"))
        if ratios.get(f"{ing}_over_{bare}") or ratios.get(f"{ing}_over_{naive}"):
            lines.append(
                f"ratios (messages/s{', mqtts' if tls else ''}): ingest / bare = "
                f"{both(f'{ing}_over_{bare}', '{:.2f}')}; ingest / naive = "
                f"{both(f'{ing}_over_{naive}', '{:.1f}')}"
            )
    tls_cost = [
        f"{c} = {both(f'{c}_tls_over_{c}', '{:.3f}')}"
        for c in CONSUMERS
        if ratios.get(f"{c}_tls_over_{c}")
    ]
    if tls_cost:
        lines.append("mqtts / mqtt (messages/s, the same as rows/s): " + "; ".join(tls_cost))
    return lines


_FORMAT_TEXT = {
    "value": ", one value per topic (a `value` route)",
    "senml": ", a SenML JSON pack per message (a `senml` route)",
    "senml-cbor": ", a SenML CBOR pack per message (a `senml` route)",
    "sparkplug": ", Sparkplug B DDATA by alias, births included (a `sparkplug` route)",
}


def render(config: Result, runs: Sequence[Result], summary: Result) -> str:
    consumers = _present(runs)
    lines = [
        f"drain benchmark: {config['messages']:,} QoS 1 messages, {config['rows']:,} "
        f"rows (~{config['mean_payload_bytes']:.0f} B), {config['devices']} devices, "
        f"broker max_inflight_messages {config['inflight']}, MQTT {config['protocol']}, "
        f"Postgres {config['postgres']}, bare client on {config['bare_loop']}, {len(runs)} run(s)"
        + _FORMAT_TEXT.get(config["format"], "")
        + (" (median (min..max))" if len(runs) > 1 else ""),
        "publish: "
        + ", ".join(f"{r['publish_s']:.1f}s ({r['publish_msgs_per_s']:,.0f} msg/s)" for r in runs),
    ]
    lines.append(f"consumers over {config['transport_text']}")
    lines.append(f"source: {config['source']}")
    lines.append(
        f"load average (1, 5, 15 min) before {config['load_average_before']}, after "
        f"{config['load_average_after']}; wall time {config['wall_s']:.0f}s"
    )
    header = ["", *(_TITLES[c] for c in consumers)]
    table = [header]
    for label, key, fmt in _ROWS:
        table.append([label, *(_cell(summary[c].get(key), fmt) for c in consumers)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        lines.append(
            "  ".join(
                cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines += _ratio_lines(summary["ratios"])
    if any(c.startswith("naive") for c in consumers):
        lines.append(
            f"naive: measured on the first {config['naive_messages']:,} messages of its "
            "backlog and extrapolated as a rate"
        )
    for r in runs:
        for c in consumers:
            res = r.get(c)
            if res is None:
                continue
            mark = "ok" if res.get("ok") else "FAILED"
            detail = res.get("error") or res.get("verified")
            lines.append(f"run {r['repeat'] + 1} {c}: {mark}: {detail}")
            if c.startswith("ingest"):
                if res.get("timing"):
                    lines.append(f"run {r['repeat'] + 1} {c} end time from {res['timing']}")
                for w in dict.fromkeys(res.get("warnings") or []):
                    lines.append(f"run {r['repeat'] + 1} {c} logged: {w}")
    return "\n".join(lines)


def _source_version() -> str:
    """The commit measured, and whether ingest/ had uncommitted changes (others edit it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ingest", "migrations"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in ingest/ or migrations/" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if unknown := a.skip - set(CONSUMERS):
        _parser().error(f"--skip: unknown consumer(s) {', '.join(sorted(unknown))}")
    if a.format != "json" and "naive" not in a.skip:
        _parser().error(
            f"--format {a.format}: the naive baseline reads only JSON; add --skip naive"
        )
    loop = a.bare_loop
    if loop == "auto":
        uvloop_on = split_ingest_args(a.ingest_args)[1].get("INGEST_UVLOOP") == "1"
        loop = "uvloop" if uvloop_on and importlib.util.find_spec("uvloop") else "asyncio"
    backlog = make_backlog(
        messages=a.messages,
        devices=a.devices,
        readings=a.readings,
        samples=a.samples,
        payload_bytes=a.payload_bytes,
        fmt=a.format,
    )
    config: Result = {
        "format": a.format,
        "messages": backlog.messages,
        "rows": backlog.rows,
        "rows_per_message": round(backlog.rows / backlog.messages, 3),
        "mean_payload_bytes": backlog.mean_payload_bytes,
        "devices": a.devices,
        "readings": a.readings,
        "samples": a.samples,
        "inflight": a.inflight,
        "protocol": a.protocol,
        "naive_messages": a.naive_messages,
        "ingest_args": a.ingest_args,
        "bare_loop": loop,
        "stats_interval": a.stats_interval,
        "python": sys.version.split()[0],
        "source": _source_version(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    runs: list[Result] = []
    started = time.monotonic()
    modes = TRANSPORTS[a.transport]
    with (
        tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp,
        open_environment(
            inflight=a.inflight,
            database_url=a.database_url,
            durable=a.durable,
            tls=True in modes,
            tuned=a.pg_tuned,
        ) as env,
    ):
        a.routes_file = None
        if a.format in ROUTES:
            a.routes_file = Path(tmp) / "routes.toml"
            a.routes_file.write_text(ROUTES[a.format])
        config["transport"] = a.transport
        config["transport_text"] = env.transport_text(modes)
        config["postgres"] = (
            "external server" if env.external_db
            else "throwaway cluster, " + ("durable (fsync on)" if a.durable else "fsync off")
            + (", tuned for ingest" if a.pg_tuned else "")
        )  # fmt: skip
        config["commit_timestamps"] = env.commit_timestamps
        for i in range(a.repeat):
            runs.append(one_run(env, a, backlog, i, loop))
    summary = summarize(runs)
    config["wall_s"] = round(time.monotonic() - started, 1)
    config["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(render(config, runs, summary))
    if a.json is not None:
        a.json.write_text(
            json.dumps({"config": config, "runs": runs, "summary": summary}, indent=2) + "\n"
        )
    ok = all(r[k]["ok"] for r in runs for k in _present(runs) if k in r)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
