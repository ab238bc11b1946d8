"""The series cache and the device memory, without a database (the database side is in
tests/integration/db/test_series.py)."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import UTC, datetime, timedelta

from ingest.flow.series import DeviceMemory, SeriesCache, missing_keys
from ingest.model import DeviceUpdate, Reading, device_status

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def test_a_fleet_of_5_metrics_costs_under_100_bytes_a_series() -> None:
    # The default size (a million series) must stay well under 150 MB: measured here on a
    # fifth of it, devices of 5 metrics.
    tracemalloc.start()
    try:
        cache = SeriesCache(200_000)
        for d in range(40_000):
            device = f"sensor-{d:07d}"
            for m in ("temperature", "humidity", "battery", "rssi", "seq"):
                cache.add(device, "".join(m), 1_000_000 + len(cache))
        gc.collect()
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache) == 200_000
    assert used / len(cache) < 100


def test_when_full_the_oldest_devices_go_whole_and_are_counted() -> None:
    cache = SeriesCache(4)
    for device in ("a", "b", "c"):
        cache.add(device, "x", ord(device))
        cache.add(device, "y", ord(device) + 100)
    assert len(cache) <= 4
    assert cache.device("a") is None and cache.device("c") == {"x": 99, "y": 199}
    assert cache.evicted == 1


def test_missing_keys_finds_what_the_cache_lacks() -> None:
    cache = SeriesCache(10)
    cache.add("d1", "t", 1)
    found: dict[str, dict[str, int]] = {}
    rows = [Reading("d1", "t", T0, 1.0), Reading("d1", "h", T0, 2.0), Reading("d2", "t", T0, 3.0)]
    assert missing_keys(cache, rows, found) == {("d1", "h"), ("d2", "t")}
    assert found == {"d1": {"t": 1}, "d2": {}}


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
