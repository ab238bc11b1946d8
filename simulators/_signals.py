"""Seeded noise and the per-device signal models.

Determinism: a device's values depend only on ``--seed``, its index and its own history,
never on how the fleet is split over connections or processes, nor on timing.

Cost: drawing from a generator written in Python costs about a microsecond per number, more
than the rest of a payload, and a ``random.Random`` per device holds 2.5 KB. So noise comes
from two tables (2**16 Gaussian and uniform numbers, ~0.1 s to build) made once per seed from
``random.Random(seed)``; each device walks them from its own start with its own odd stride,
which visits every entry once per period (65,536 draws: ~21,800 samples before a device's
noise repeats, six hours at one message a second). Per-device parameters come from SplitMix64
(Steele et al., OOPSLA 2014) keyed by ``(seed, index)``.

Signals (per sample):

- ``temperature``: a daily cycle in the device's local solar time (coldest around 03:00,
  warmest around 15:00) plus small Gaussian noise; degC, 2 decimals.
- ``humidity``: a bounded random walk in [5, 100] %RH, weakly pulled towards the device's mean.
- ``battery``: drains a little with every sample; a flat battery is replaced (back to 100 %).
- ``rssi``: integer dBm, Gaussian jitter around the device's link quality, in [-120, -30].
- ``fw``: the device's firmware version string.
"""

from __future__ import annotations

import functools
import math
import random
from array import array

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_INV_2_53 = 1.0 / (1 << 53)
_TWO_PI_OVER_DAY_MS = 2.0 * math.pi / 86_400_000.0

TABLE_BITS = 16
TABLE_SIZE = 1 << TABLE_BITS
_MASK = TABLE_SIZE - 1

#: Independent streams of one device.
STREAM_PARAMS = 0
STREAM_SIGNALS = 1
STREAM_FAULTS = 2

FIRMWARE = ("1.2.3", "1.2.4", "1.3.0", "2.0.1")


def mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijective 64-bit hash with good avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class Rng:
    """SplitMix64 keyed by ``(seed, index, stream)``: for per-device parameters."""

    __slots__ = ("state",)

    def __init__(self, seed: int, index: int = 0, stream: int = 0) -> None:
        key = mix64(seed & _M64) + index * _GOLDEN + stream * 0x632BE59BD9B4E019
        self.state = mix64(key & _M64)

    def next64(self) -> int:
        self.state = s = (self.state + _GOLDEN) & _M64
        return mix64(s)

    def uniform(self) -> float:
        """A float in [0, 1)."""
        return (self.next64() >> 11) * _INV_2_53

    def below(self, n: int) -> int:
        """An int in [0, n) (n small: the modulo bias is below 2**-40)."""
        return self.next64() % n


@functools.lru_cache(maxsize=4)
def noise_tables(seed: int) -> tuple[array[float], array[float]]:
    """``(gaussian, uniform)``: 2**16 N(0, 1) and U[0, 1) numbers drawn from ``seed``."""
    r = random.Random(seed)
    gauss = r.gauss
    rand = r.random
    return (
        array("d", [gauss(0.0, 1.0) for _ in range(TABLE_SIZE)]),
        array("d", [rand() for _ in range(TABLE_SIZE)]),
    )


class Noise:
    """A device's walk through a noise table: ``next()`` returns the next number."""

    __slots__ = ("_pos", "_stride", "_table")

    def __init__(self, table: array[float], seed: int, index: int, stream: int) -> None:
        r = Rng(seed, index, stream)
        self._table = table
        self._pos = r.below(TABLE_SIZE)
        self._stride = r.below(TABLE_SIZE) | 1  # odd: a full cycle over the table

    def next(self) -> float:
        self._pos = p = (self._pos + self._stride) & _MASK
        return self._table[p]


def fixed(value: float, scale: float) -> float:
    """``value`` rounded half up to ``1/scale`` (``round(x, 2)`` costs 6x more in CPython)."""
    return math.floor(value * scale + 0.5) / scale


class Signals:
    """The sensor state of one device; :meth:`step` produces the next sample's values."""

    __slots__ = (
        "_amplitude",
        "_base",
        "_drain",
        "_humidity_mean",
        "_noise",
        "_phase_ms",
        "_rssi_base",
        "battery",
        "fw",
        "humidity",
    )

    def __init__(self, seed: int, index: int) -> None:
        p = Rng(seed, index, STREAM_PARAMS)
        self._base = 14.0 + 12.0 * p.uniform()  # daily mean, degC
        self._amplitude = 2.0 + 5.0 * p.uniform()  # half the day/night swing
        # Longitude as a time offset: local solar time = UTC + offset; the peak at 15:00 local
        # is folded into the phase.
        offset_hours = -11.0 + 25.0 * p.uniform()
        self._phase_ms = (offset_hours - 15.0) * 3_600_000.0
        self._humidity_mean = 35.0 + 35.0 * p.uniform()
        self.humidity = self._humidity_mean + 10.0 * (p.uniform() - 0.5)
        self.battery = 60.0 + 40.0 * p.uniform()
        self._drain = 0.0005 + 0.002 * p.uniform()  # % per sample
        self._rssi_base = -95.0 + 50.0 * p.uniform()
        self.fw = FIRMWARE[p.below(len(FIRMWARE))]
        self._noise = Noise(noise_tables(seed)[0], seed, index, STREAM_SIGNALS)

    def temperature_mean(self, ts_ms: int) -> float:
        """The noiseless daily cycle at ``ts_ms`` (what the noise is added to)."""
        angle = (ts_ms + self._phase_ms) * _TWO_PI_OVER_DAY_MS
        return self._base + self._amplitude * math.cos(angle)

    def step(self, ts_ms: int) -> tuple[float, float, float, int]:
        """Advance one sample: ``(temperature, humidity, battery, rssi)`` at ``ts_ms``."""
        # Hot path (once per sample): the noise walk and the rounding are inlined, which
        # halves its cost in CPython.
        noise = self._noise
        table = noise._table
        stride = noise._stride
        p1 = (noise._pos + stride) & _MASK
        p2 = (p1 + stride) & _MASK
        noise._pos = p3 = (p2 + stride) & _MASK
        floor = math.floor
        angle = (ts_ms + self._phase_ms) * _TWO_PI_OVER_DAY_MS
        temperature = self._base + self._amplitude * math.cos(angle) + 0.15 * table[p1]
        h = self.humidity
        h += 0.05 * (self._humidity_mean - h) + 0.5 * table[p2]
        if h < 5.0:
            h = 10.0 - h
        elif h > 100.0:
            h = 200.0 - h
        self.humidity = h
        b = self.battery - self._drain
        self.battery = b = 100.0 if b <= 0.0 else b
        rssi = floor(self._rssi_base + 3.0 * table[p3] + 0.5)
        rssi = -120 if rssi < -120 else (-30 if rssi > -30 else rssi)
        return (
            floor(temperature * 100.0 + 0.5) / 100.0,
            floor(h * 10.0 + 0.5) / 10.0,
            floor(b * 1000.0 + 0.5) / 1000.0,
            rssi,
        )

    def peek(self, ts_ms: int) -> tuple[float, float, float, int]:
        """Plausible values without advancing the state (for malformed payloads)."""
        return (
            fixed(self.temperature_mean(ts_ms), 100.0),
            fixed(self.humidity, 10.0),
            fixed(self.battery, 1000.0),
            math.floor(self._rssi_base + 0.5),
        )
