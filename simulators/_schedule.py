"""When each message is due, and which process and connection sends it.

The fleet's messages are numbered by *slot*: slot ``m`` is device ``m % N``'s message number
``m // N`` and is due ``m / (N x rate)`` seconds after the start. So each device sends every
``1 / rate`` seconds, device ``i`` offset by ``i / (N x rate)``: the fleet's phases are spread
evenly over the period, and 10,000 devices at 0.1 msg/s publish one message every 100 us rather
than 10,000 every 10 s. Due times are computed from the start (absolute), never by adding
intervals, so a late wake-up or a slow message does not push later messages back: the sender
catches up, and the rate does not drift.

Devices are dealt round-robin: process ``p`` of ``P`` owns the devices with ``i % P == p``;
within a process, connection ``c`` of ``C`` owns every ``C``-th of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

T = TypeVar("T")


class _Indexed(Protocol):
    @property
    def index(self) -> int: ...


#: ``(slot, position in the group of devices)``: one message due.
Slot = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Schedule:
    """The fleet's timetable: ``devices`` in all processes, ``rate`` per device, and at most
    ``count`` messages per device or slots due before ``duration`` seconds (neither: endless).
    """

    devices: int
    rate: float
    count: int | None = None
    duration: float | None = None

    @property
    def interval(self) -> float:
        """Seconds between two consecutive slots of the fleet."""
        return 1.0 / (self.devices * self.rate)

    def offset(self, slot: int) -> float:
        """Seconds after the start at which ``slot`` is due."""
        return slot / (self.devices * self.rate)

    @property
    def total_slots(self) -> int | None:
        """Messages of the whole fleet (``None``: until stopped)."""
        if self.count is not None:
            return self.count * self.devices
        if self.duration is not None:
            # Slots m with m / (N x rate) < duration. The product is usually a whole number
            # in floating point disguise (0.1 x 10,000 x 60 = 60000.000000000007).
            exact = self.duration * self.devices * self.rate
            nearest = round(exact)
            if abs(exact - nearest) <= 1e-9 * max(1.0, exact):
                return int(nearest)
            return math.ceil(exact)
        return None

    def messages_for(self, index: int) -> int | None:
        """How many messages device ``index`` sends (``None``: until stopped)."""
        if self.count is not None:
            return self.count
        total = self.total_slots
        if total is None:
            return None
        return max(0, (total - index + self.devices - 1) // self.devices)

    @property
    def nominal_seconds(self) -> float | None:
        """How long the run takes when every message goes out on time."""
        if self.count is not None:
            return self.count / self.rate
        return self.duration

    def slots(self, devices: Sequence[_Indexed]) -> Iterator[Slot]:
        """``(slot, position in devices)`` in due order for a group of devices sorted by index."""
        n = self.devices
        limits = [self.messages_for(d.index) for d in devices]
        active = [(pos, d.index) for pos, d in enumerate(devices) if limits[pos] != 0]
        k = 0
        while active:
            base = k * n
            for pos, index in active:
                yield base + index, pos
            k += 1
            active = [
                (pos, index) for pos, index in active if (lim := limits[pos]) is None or lim > k
            ]


def process_devices(devices: int, processes: int, process: int) -> range:
    """The device indexes of ``process`` (0-based) when the fleet is split over ``processes``."""
    return range(process, devices, processes)


def process_connections(connections: int, processes: int, process: int, devices: int) -> int:
    """How many of the ``connections`` process ``process`` opens (at least one, at most one per
    device it owns).
    """
    share = connections // processes + (1 if process < connections % processes else 0)
    owned = len(process_devices(devices, processes, process))
    return max(1, min(share, owned))


def deal(items: Sequence[T], groups: int) -> list[list[T]]:
    """Split ``items`` round-robin into ``groups`` lists (keeps each list in order)."""
    return [list(items[g::groups]) for g in range(groups)]
