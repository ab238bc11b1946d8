"""The series cache and the device memory, without a database (the database side is in
tests/integration/db/test_series.py)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from ingest.flow.series import DeviceMemory, SeriesCache
from ingest.model import DeviceUpdate, Reading, device_status

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def _bytes_a_series(devices: int, metrics: Sequence[str]) -> float:
    """What a full cache of ``devices`` x ``metrics`` holds per series, device strings included
    (each made anew, as decoding makes them). tracemalloc makes this slow: ~40 s a million."""
    tracemalloc.start()
    try:
        cache = SeriesCache(devices * len(metrics))
        for d in range(devices):
            device = f"sensor-{d:07d}"
            for m in metrics:
                cache.add(device, m, 1_000_000 + len(cache))
        gc.collect()
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache) == devices * len(metrics) and cache.evicted == 0
    return used / len(cache)


# The default size is a million series, which must stay well under 150 MB. Measured: ~126 bytes
# a series for devices of one metric (310 with a dict per device), ~89 for devices of five.


@pytest.mark.slow
def test_a_million_series_of_one_metric_devices_cost_under_140_bytes_each() -> None:
    assert _bytes_a_series(1_000_000, ["temperature"]) < 140


@pytest.mark.slow
def test_a_million_series_of_five_metric_devices_cost_under_100_bytes_each() -> None:
    assert _bytes_a_series(200_000, ["temperature", "humidity", "battery", "rssi", "seq"]) < 100


def test_a_device_of_one_series_grows_into_several() -> None:
    cache = SeriesCache(10)
    cache.add("d", "t", 1)
    assert (cache.get("d", "t"), cache.get("d", "h"), len(cache)) == (1, None, 1)
    cache.add("d", "t", 5)  # the same series again (looked up anew): replaced, not added
    cache.add("d", "h", 2)
    cache.add("e", "h", 3)
    assert (cache.get("d", "t"), cache.get("d", "h"), cache.get("e", "h")) == (5, 2, 3)
    assert cache.get("e", "t") is None and len(cache) == 3


def test_past_the_metric_codes_one_series_devices_still_work() -> None:
    cache = SeriesCache(100_000)
    for i in range(70_000):  # more distinct names than the packed entries can code
        cache.add(f"d{i}", f"m{i}", i + 1)
    assert [cache.get(f"d{i}", f"m{i}") for i in (0, 65_535, 65_536, 69_999)] == [
        1,
        65_536,
        65_537,
        70_000,
    ]
    assert cache.get("d69999", "m0") is None


def test_when_full_the_oldest_devices_go_whole_and_their_series_are_counted() -> None:
    cache = SeriesCache(4)
    for device in ("a", "b", "c"):
        cache.add(device, "x", ord(device))
        cache.add(device, "y", ord(device) + 100)
    assert len(cache) <= 4
    assert cache.get("a", "x") is None and cache.get("a", "y") is None
    assert (cache.get("c", "x"), cache.get("c", "y")) == (99, 199)
    assert cache.evicted == 2  # both series of device a


def test_lookup_gives_an_id_per_row_and_the_rows_the_cache_lacks() -> None:
    cache = SeriesCache(10)
    cache.add("d1", "t", 1)
    cache.add("d3", "t", 3)
    cache.add("d3", "h", 4)
    rows = [
        Reading("d1", "t", T0, 1.0),
        Reading("d1", "h", T0, 2.0),
        Reading("d2", "t", T0, 3.0),
        Reading("d3", "h", T0, 4.0),
        Reading("d3", "t", T0, 5.0),
    ]
    assert cache.lookup(rows) == ([1, 0, 0, 4, 3], [1, 2])


def test_device_memory_keeps_only_what_changed() -> None:
    memory = DeviceMemory(100)
    first = memory.plan([DeviceUpdate("d", tags={"site": "a", "line": "1"}, units={"t": "°C"})])
    assert first.devices == [("d", {"site": "a", "line": "1"}, None, None)]
    assert first.units == [("d", "t", "°C")]
    memory.remember(first)
    again = memory.plan([DeviceUpdate("d", tags={"site": "a"}, units={"t": "°C"})])
    assert not again
    changed = memory.plan(
        [
            DeviceUpdate("d", tags={"line": "2"}),
            device_status("d", "online", T0 + timedelta(1)),
            device_status("d", "offline", T0),  # older within the batch: loses
        ]
    )
    assert changed.devices == [("d", {"line": "2"}, "online", T0 + timedelta(1))]
    memory.remember(changed)
    older = memory.plan([device_status("d", "offline", T0)])
    assert not older


def test_device_memory_is_bounded() -> None:
    memory = DeviceMemory(3)
    for d in range(10):
        memory.remember(memory.plan([DeviceUpdate(f"d{d}", tags={"k": "v"})]))
    # The first devices were forgotten: their tags are written again, which is harmless.
    assert memory.plan([DeviceUpdate("d0", tags={"k": "v"})])
    assert not memory.plan([DeviceUpdate("d9", tags={"k": "v"})])
