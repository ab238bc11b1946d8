"""The writer's series cache: bytes per series, and the per-reading cost of its lookup.

    python -m benchmarks.series_cache [--shapes 1000000x1 200000x5] [--repeat 5]

For each shape DEVICESxMETRICS, fills a :class:`~ingest.flow.series.SeriesCache` of exactly
that many series (device ids ``sensor-NNNNNNN``, metric names of the JSON benchmark), measuring
what it holds with ``tracemalloc`` (device strings included); then times, per reading, what the
writer does for every batch of readings: the cache lookup (:meth:`SeriesCache.lookup`) and the
binary COPY encoding that takes its ids (:func:`ingest.flow.pgcopy.encode_points`, which also
computes the batch's dashboard aggregates in the same pass), over 20
batches of 5,000 readings from devices drawn at random (messages of METRICS readings, each with
its own freshly made device string, as decoding makes them). Best of ``--repeat`` runs. No
database, no broker.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

from ingest.flow.pgcopy import encode_points
from ingest.flow.series import SeriesCache
from ingest.model import Reading

__all__ = ["main"]

METRICS = ("temperature", "humidity", "battery", "rssi", "seq")
T0 = datetime(2024, 6, 1, tzinfo=UTC)


def _fill(devices: int, metrics: int) -> tuple[SeriesCache, list[str], float]:
    """A full cache, its device ids, and the bytes it holds per series."""
    names = METRICS[:metrics]
    tracemalloc.start()
    try:
        cache = SeriesCache(devices * metrics)
        for d in range(devices):
            device = f"sensor-{d:07d}"
            for m in names:
                cache.add(device, "".join(m), len(cache) + 1_000_000)
        gc.collect()
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return cache, [f"sensor-{d:07d}" for d in range(devices)], used / len(cache)


def _batches(devices: list[str], metrics: int) -> list[list[Reading]]:
    rnd = random.Random(1)
    batches = []
    for b in range(20):
        rows: list[Reading] = []
        for k in range(5000 // metrics):
            device = "".join(rnd.choice(devices))  # a new string, as each message's is
            ts = T0 + timedelta(seconds=b * 1000 + k)
            rows.extend(Reading(device, m, ts, 1.5) for m in METRICS[:metrics])
        batches.append(rows)
    return batches


def _time(cache: SeriesCache, batches: list[list[Reading]], repeat: int) -> tuple[float, float]:
    """Nanoseconds per reading: the lookup, the encoding (best of ``repeat``)."""
    readings = sum(map(len, batches))
    best_lookup = best_encode = float("inf")
    for _ in range(repeat):
        lookup = encode = 0.0
        for rows in batches:
            t0 = time.thread_time()
            ids, holes = cache.lookup(rows)
            t1 = time.thread_time()
            encode_points(rows, ids, 7)
            lookup += t1 - t0
            encode += time.thread_time() - t1
            if holes:
                raise AssertionError("the cache was filled with every series")
        best_lookup = min(best_lookup, lookup / readings)
        best_encode = min(best_encode, encode / readings)
    return best_lookup * 1e9, best_encode * 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.series_cache", description=__doc__)
    p.add_argument("--shapes", nargs="+", default=["1000000x1", "200000x5"])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    for shape in args.shapes:
        devices, metrics = (int(x) for x in shape.split("x"))
        cache, ids, per_series = _fill(devices, metrics)
        lookup, encode = _time(cache, _batches(ids, metrics), args.repeat)
        print(
            f"{devices:,} devices x {metrics} metrics: {per_series:.0f} bytes a series "
            f"({per_series * len(cache) / 1e6:.0f} MB); per reading: lookup {lookup:.0f} ns, "
            f"COPY encoding {encode:.0f} ns"
        )


if __name__ == "__main__":
    main()
