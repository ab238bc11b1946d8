"""What decoding a Sparkplug B message costs, beside the same readings as ``json``.

    python -m benchmarks.sparkplug_decode [--messages 200000] [--metrics 5] [--repeat 3]

In process, no broker and no database: ``ingest.formats.decode.decode`` on a DDATA of
``--metrics`` metrics by alias (Double, one of them a String like the simulator's ``fw``), its
device born first, and on the JSON object with the same values through the default route. The
figures: microseconds per message and messages per second for each, the best of ``--repeat``
runs (the machine's other work only ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

from ingest.formats.decode import FORMATS, RouteTable, decode, single_route
from ingest.formats.routes import parse_routes
from ingest.formats.sparkplug_schema import DataType, Payload
from ingest.model import Decoded


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparkplug_decode", description=__doc__)
    p.add_argument("--messages", type=int, default=200_000, help="messages per run (200000)")
    p.add_argument("--metrics", type=int, default=5, help="metrics per message (5)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts (3)")
    return p


def _sparkplug(metrics: int, ms: int) -> tuple[RouteTable, bytes, bytes]:
    routes = parse_routes([{"topic": "spBv1.0/#", "format": "sparkplug"}], FORMATS)
    birth, data = Payload(timestamp=ms), Payload(timestamp=ms + 1, seq=1)
    for i in range(metrics):
        kind = DataType.String if i == metrics - 1 else DataType.Double
        value = {"string_value": "1.4.2"} if kind == DataType.String else {"double_value": 1.5}
        birth.metrics.add(name=f"metric_{i}", alias=i + 1, datatype=kind, **value)
        data.metrics.add(alias=i + 1, **value)
    return routes, birth.SerializeToString(), data.SerializeToString()


def _json(metrics: int, ms: int) -> bytes:
    doc: dict[str, object] = {"ts": ms + 1}
    for i in range(metrics):
        doc[f"metric_{i}"] = "1.4.2" if i == metrics - 1 else 1.5
    return json.dumps(doc).encode()


def _run(topic: str, payload: bytes, routes: RouteTable, n: int, at: datetime) -> float:
    result = decode(topic, payload, at, routes)
    assert isinstance(result, Decoded), result
    t0 = time.perf_counter()
    for _ in range(n):
        decode(topic, payload, at, routes)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    at = datetime.now(UTC)
    ms = int(at.timestamp() * 1000) - 1000
    routes, birth, data = _sparkplug(args.metrics, ms)
    born = decode("spBv1.0/bench/DBIRTH/edge1/dev1", birth, at, routes)
    assert isinstance(born, Decoded), born
    cases = {
        "sparkplug DDATA": ("spBv1.0/bench/DDATA/edge1/dev1", data, routes),
        "json": ("devices/dev1/telemetry", _json(args.metrics, ms), single_route(
            "devices/{device_id}/telemetry")),
    }  # fmt: skip
    for name, (topic, payload, table) in cases.items():
        best = min(_run(topic, payload, table, args.messages, at) for _ in range(args.repeat))
        print(
            f"{name:16} {len(payload):4d} bytes  {best / args.messages * 1e6:6.2f} us/message"
            f"  {args.messages / best:10,.0f} messages/s"
        )


if __name__ == "__main__":
    main()
