"""What decoding one message costs in each format, for the same samples.

    python -m benchmarks.decode [--messages 50000] [--devices 100] [--readings 5] [--repeat 5]
                                [--formats json,senml,senml-cbor,sparkplug]

In process, no broker and no database: ``ingest.formats.decode.decode`` on the drain
benchmark's backlog (``benchmarks/_backlog.py``) of each format, built once: the same samples
(``--readings`` numbers, ``seq`` among them, and the text ``fw``) as a JSON object through the
default route, a SenML pack in JSON and in CBOR through a ``senml`` route, and a Sparkplug B
DDATA by alias through a ``sparkplug`` route whose state the backlog's NBIRTHs and DBIRTHs
primed (decoded before the timing, not timed).

Each run decodes every data message of every format once, the formats one after the other in
a new order each run; the figures are the median over ``--repeat`` runs (min..max beside it):
microseconds per message, nanoseconds per metric (a metric: one of the ``--readings`` numbers
or ``fw``), and the ratio to ``json``. A load on the machine slows every format alike only
roughly: compare ratios from one run, not figures from different ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from benchmarks._backlog import FORMATS, ROUTES, Backlog, make_backlog
from ingest.formats.decode import FORMATS as DECODERS
from ingest.formats.decode import RouteTable, decode, single_route
from ingest.formats.routes import parse_routes
from ingest.model import Decoded

__all__ = ["Case", "main", "prepare"]

DEFAULT_FORMATS = ("json", "senml", "senml-cbor", "sparkplug")


class Case(NamedTuple):
    """One format's messages, ready to decode."""

    routes: RouteTable
    messages: list[tuple[str, bytes]]  # (topic, payload), the data in backlog order
    mean_bytes: float


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.decode", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--messages", type=int, default=50_000, help="data messages a run (50000)")
    p.add_argument("--devices", type=int, default=100, help="devices (100)")
    p.add_argument("--readings", type=int, default=5, help="numbers per sample, seq included (5)")
    p.add_argument("--repeat", type=int, default=5, help="runs; medians (5)")
    p.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"comma-separated, among {', '.join(f for f in FORMATS if f != 'value')}",
    )
    return p


def _routes(fmt: str) -> RouteTable:
    if fmt == "json":
        return single_route("devices/{device_id}/telemetry")
    return parse_routes(tomllib.loads(ROUTES[fmt])["routes"], DECODERS)


def _flatten(lines: dict[str, list[bytes]]) -> list[tuple[str, bytes]]:
    """Round-robin over the topics, as the broker would interleave the devices."""
    queues = list(lines.items())
    longest = max(len(payloads) for _, payloads in queues)
    return [(t, ps[i]) for i in range(longest) for t, ps in queues if i < len(ps)]


def prepare(fmt: str, backlog: Backlog, at: datetime) -> Case:
    """The route table (its state primed by the backlog's preamble) and the data messages;
    every message is decoded once here, so a payload the route rejects fails before timing."""
    routes = _routes(fmt)
    for group in backlog.preamble:
        for topic, payload in _flatten(group):
            born = decode(topic, payload, at, routes)
            if not isinstance(born, Decoded):
                raise RuntimeError(f"{fmt}: birth on {topic} not decoded: {born}")
    messages = _flatten(backlog.lines)
    for topic, payload in messages:
        result = decode(topic, payload, at, routes)
        if not isinstance(result, Decoded):
            raise RuntimeError(f"{fmt}: message on {topic} not decoded: {result}")
    return Case(routes, messages, backlog.mean_payload_bytes)


def _time(case: Case, at: datetime) -> float:
    routes = case.routes
    t0 = time.perf_counter()
    for topic, payload in case.messages:
        decode(topic, payload, at, routes)
    return time.perf_counter() - t0


def _us(case: Case, times: Sequence[float]) -> list[float]:
    """Microseconds per message of each run."""
    return [t / len(case.messages) * 1e6 for t in times]


def _row(name: str, case: Case, us: Sequence[float], metrics: int, base: Sequence[float]) -> str:
    mid = statistics.median(us)
    return (
        f"{name:11} {case.mean_bytes:6.1f} B  {mid:7.2f} us/msg ({min(us):.2f}..{max(us):.2f})"
        f"  {mid * 1000 / metrics:7.0f} ns/metric  {1e6 / mid:8,.0f} msg/s"
        f"  x{mid / statistics.median(base):.2f} (best x{min(us) / min(base):.2f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    if bad := [f for f in formats if f not in FORMATS or f == "value"]:
        _parser().error(f"--formats: unknown or unsupported {', '.join(bad)}")
    at = datetime.now(UTC)
    cases: dict[str, Case] = {}
    for fmt in formats:
        # The sparkplug backlog counts its births among the messages: as many data messages.
        extra = 0 if fmt != "sparkplug" else a.devices + -(-a.devices // 10)
        backlog = make_backlog(
            messages=a.messages + extra,
            devices=a.devices,
            readings=a.readings,
            samples=None,
            payload_bytes=0,
            fmt=fmt,
        )
        cases[fmt] = prepare(fmt, backlog, at)
    times: dict[str, list[float]] = {f: [] for f in formats}
    for run in range(a.repeat):
        order = formats[run % len(formats) :] + formats[: run % len(formats)]
        for fmt in order:
            times[fmt].append(_time(cases[fmt], at))
    metrics = a.readings + 1  # fw
    base = "json" if "json" in formats else formats[0]
    us = {fmt: _us(cases[fmt], times[fmt]) for fmt in formats}
    print(
        f"decode: {a.messages:,} data messages per format, {a.devices} devices, {a.readings} "
        f"numbers + fw per message ({metrics} metrics), median of {a.repeat} runs (min..max); "
        f"ratio to {base}: of the medians (of the best runs)"
    )
    for fmt in formats:
        print(_row(fmt, cases[fmt], us[fmt], metrics, us[base]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
