"""Scheduling arithmetic and the split of the fleet (no sockets)."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import pytest

from simulators._config import device_id
from simulators._schedule import (
    Schedule,
    deal,
    process_connections,
    process_devices,
)


@dataclass
class Dev:
    index: int


def devs(*indexes: int) -> list[Dev]:
    return [Dev(i) for i in indexes]


def test_device_ids() -> None:
    assert device_id(0) == "dev-00001"
    assert device_id(99_998) == "dev-99999"
    assert device_id(99_999) == "dev-100000"
    assert device_id(1_234_566) == "dev-1234567"


def test_slot_offsets_are_absolute() -> None:
    s = Schedule(devices=4, rate=2.0)
    assert s.interval == 1 / 8
    assert [s.offset(m) for m in range(4)] == [0.0, 0.125, 0.25, 0.375]
    # Computed from the start, not accumulated: no drift after a billion slots.
    s = Schedule(devices=3, rate=0.7)
    assert s.offset(10**9) == pytest.approx(10**9 / 2.1, rel=1e-12)


def test_each_device_sends_every_period_offset_by_its_index() -> None:
    s = Schedule(devices=4, rate=2.0, count=3)
    slots = list(s.slots(devs(1, 3)))
    assert slots == [(1, 0), (3, 1), (5, 0), (7, 1), (9, 0), (11, 1)]
    device_1 = [s.offset(m) for m, pos in slots if pos == 0]
    assert device_1 == [0.125, 0.625, 1.125]  # every 1 / rate = 0.5 s


def test_count_mode_covers_every_slot_exactly_once_over_the_groups() -> None:
    s = Schedule(devices=10, rate=1.0, count=7)
    fleet = devs(*range(10))
    seen = Counter(m for group in deal(fleet, 3) for m, _ in s.slots(group))
    assert sorted(seen) == list(range(70))
    assert set(seen.values()) == {1}
    assert s.total_slots == 70 and s.nominal_seconds == 7.0


def test_slots_of_a_group_come_in_due_order() -> None:
    s = Schedule(devices=10, rate=3.0, count=5)
    for group in deal(devs(*range(10)), 4):
        ms = [m for m, _ in s.slots(group)]
        assert ms == sorted(ms)


def test_duration_mode_counts_exactly_the_slots_due_before_the_end() -> None:
    # 0.1 x 10,000 x 60 is 60000.000000000007 in floating point: still 60,000 slots.
    s = Schedule(devices=10_000, rate=0.1, duration=60.0)
    assert s.total_slots == 60_000
    per_device = [s.messages_for(i) for i in range(10_000)]
    assert sum(n or 0 for n in per_device) == 60_000
    assert set(per_device) == {6}
    s = Schedule(devices=7, rate=3.0, duration=2.5)  # 52.5 slots -> 53 due before 2.5 s
    assert s.total_slots == 53
    counts = [s.messages_for(i) or 0 for i in range(7)]
    assert sum(counts) == 53 and max(counts) - min(counts) <= 1
    last = max(m for m, _ in s.slots(devs(*range(7))))
    assert s.offset(last) < 2.5 <= s.offset(last + 1)


def test_a_device_past_the_end_sends_nothing() -> None:
    s = Schedule(devices=10_000, rate=0.1, duration=5.0)  # a 10 s period: half send once
    assert s.messages_for(0) == 1 and s.messages_for(4_999) == 1
    assert s.messages_for(5_000) == 0
    assert list(s.slots(devs(5_000, 9_999))) == []


def test_phases_are_spread_so_a_large_fleet_never_bursts() -> None:
    # 10,000 devices at 0.1 msg/s: 1,000 msg/s, i.e. exactly 100 in every 100 ms window.
    s = Schedule(devices=10_000, rate=0.1, duration=20.0)
    per_window = Counter(int(s.offset(m) * 10) for m, _ in s.slots(devs(*range(10_000))))
    assert len(per_window) == 200
    assert set(per_window.values()) == {100}


def test_fractional_rates() -> None:
    s = Schedule(devices=1, rate=0.25, count=3)
    assert [s.offset(m) for m, _ in s.slots(devs(0))] == [0.0, 4.0, 8.0]
    assert s.nominal_seconds == 12.0


def test_endless_schedule() -> None:
    s = Schedule(devices=2, rate=5.0)
    assert s.total_slots is None and s.messages_for(1) is None and s.nominal_seconds is None
    first = list(itertools.islice(s.slots(devs(0, 1)), 10_000))
    assert [m for m, _ in first] == list(range(10_000))


@pytest.mark.parametrize(
    ("devices", "processes", "connections"),
    [(1, 1, 1), (10, 1, 4), (5, 2, 5), (5, 3, 5), (7, 3, 3), (100, 4, 16), (9, 4, 5)],
)
def test_processes_and_connections_split_the_fleet(
    devices: int, processes: int, connections: int
) -> None:
    owned = [list(process_devices(devices, processes, p)) for p in range(processes)]
    assert sorted(i for part in owned for i in part) == list(range(devices))
    conns = [process_connections(connections, processes, p, devices) for p in range(processes)]
    assert sum(conns) == connections
    for part, c in zip(owned, conns, strict=True):
        groups = deal(part, c)
        assert len(groups) == c and all(groups)


def test_deal_is_round_robin_and_keeps_order() -> None:
    assert deal([1, 2, 3, 4, 5], 2) == [[1, 3, 5], [2, 4]]
