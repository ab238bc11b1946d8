"""One simulated device: its id, topic, sequence numbers, timestamps and next message.

A message is either valid (``samples_per_message`` samples, each with the device's next
``seq`` and a timestamp in epoch milliseconds that no other sample of this device has) or
malformed (``--bad-ratio``) or hostile (``--hostile-ratio``; see ``_faults``): a hostile one is
bad (a dead letter by the daemon's limits) or ``extreme``, valid samples whose values are the
largest doubles. Valid messages may be marked to be published twice (``--duplicate-ratio``),
and single samples may carry a timestamp minutes in the past (``--late-ratio``).

Timestamp uniqueness per device (the daemon's key is ``(device_id, metric, ts)``, so two
samples sharing a millisecond would collapse into one row):

- on-time samples are strictly increasing: a sample never reuses the previous one's
  millisecond (above 1,000 samples per second per device they run ahead of the clock);
- late samples are strictly decreasing and below every on-time sample of the run (before the
  device's first possible timestamp), so they never meet an on-time sample either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from simulators._config import device_id
from simulators._faults import BAD_KINDS, EXTREME, EXTREME_VALUES, HOSTILE_KINDS, bad_payload
from simulators._senml import Encoder
from simulators._signals import STREAM_FAULTS, Noise, Signals, noise_tables

#: How far in the past a late sample is (uniform in this range, milliseconds).
LATE_MIN_MS = 2 * 60_000
LATE_MAX_MS = 15 * 60_000


@dataclass(frozen=True, slots=True)
class FaultRatios:
    bad: float = 0.0
    duplicate: float = 0.0
    late: float = 0.0
    hostile: float = 0.0


NO_FAULTS = FaultRatios()


#: ``(payload, samples, bad, duplicate, late)``: the payload bytes; how many valid samples it
#: carries (0 for a malformed one); the kind of malformed payload or ``None``; whether to publish
#: it a second time right after the first (``--duplicate-ratio``); how many of its samples have a
#: late timestamp. A plain tuple: a NamedTuple costs 0.4 us more per message.
Message = tuple[bytes, int, str | None, bool, int]


class Device:
    """State and counters of one simulated device (0-based ``index`` within the fleet)."""

    __slots__ = (
        "_encode",
        "_faults",
        "_k",
        "_last_ts",
        "_late_floor",
        "_plain",
        "_ratios",
        "_spacing_ms",
        "bad",
        "device_id",
        "duplicates",
        "extreme",
        "failed",
        "index",
        "kinds",
        "late",
        "messages",
        "metric_topics",
        "published",
        "seq",
        "signals",
        "topic",
        "wire_topic",
    )

    def __init__(
        self,
        index: int,
        *,
        seed: int,
        topic_template: str,
        rate: float,
        samples_per_message: int = 1,
        faults: FaultRatios = NO_FAULTS,
        name: str | None = None,
        encode: Encoder | None = None,
    ) -> None:
        self.index = index
        self.device_id = device_id(index) if name is None else name
        self.topic = topic_template.replace("{device_id}", self.device_id)
        #: The topic as the MQTT layer sends it (filled in by the publisher).
        self.wire_topic = b""
        #: ``--format value``: the topic of each metric as the MQTT layer sends it.
        self.metric_topics: dict[str, bytes] | None = None
        self.signals = Signals(seed, index)
        self._faults = Noise(noise_tables(seed)[1], seed, index, STREAM_FAULTS)
        self._ratios = faults
        #: How samples become a payload (``--format senml``); None: JSON, as they are.
        self._encode = encode
        self._plain = (
            encode is None
            and samples_per_message == 1
            and not (faults.bad or faults.duplicate or faults.late or faults.hostile)
        )
        self._k = samples_per_message
        # Samples of one message are spread over the interval between messages.
        self._spacing_ms = 1000.0 / (rate * samples_per_message)
        self.seq = 0
        self._last_ts = -(1 << 62)
        self._late_floor = -(1 << 62)
        self.start(0)
        # Counters for the report.
        self.messages = 0  # scheduled messages generated (a duplicate is not a new one)
        self.bad = 0
        self.kinds: dict[str, int] = {}  # bad messages by kind
        self.extreme = 0  # valid messages of extreme values
        self.duplicates = 0
        self.late = 0
        self.published = 0  # acknowledged (QoS 1) / handed to the socket (QoS 0), duplicates too
        self.failed = 0

    def start(self, start_ms: int) -> None:
        """Set the run's start (epoch ms): late samples are placed before anything on time."""
        earliest = start_ms - math.ceil((self._k - 1) * self._spacing_ms)
        self._late_floor = earliest

    def next_message(self, wall_ms: float) -> Message:
        """The message scheduled at ``wall_ms`` (epoch milliseconds)."""
        ratios = self._ratios
        now = int(wall_ms)
        self.messages += 1
        if self._plain:
            # The common case, kept lean: one sample, no fault draws.
            ts = now if now > self._last_ts else self._last_ts + 1
            self._last_ts = ts
            self.seq = seq = self.seq + 1
            t, h, b, r = self.signals.step(ts)
            payload = orjson.dumps(
                {
                    "ts": ts,
                    "seq": seq,
                    "temperature": t,
                    "humidity": h,
                    "battery": b,
                    "rssi": r,
                    "fw": self.signals.fw,
                }
            )
            return payload, 1, None, False, 0

        draw = self._faults.next
        if ratios.bad and draw() < ratios.bad:
            return self._bad(BAD_KINDS[int(draw() * len(BAD_KINDS))], now)
        extreme = False
        if ratios.hostile and draw() < ratios.hostile:
            kind = HOSTILE_KINDS[int(draw() * len(HOSTILE_KINDS))]
            if kind != EXTREME:
                return self._bad(kind, now)
            extreme = True
            self.extreme += 1
        return self._valid(now, extreme)

    def _bad(self, kind: str, now: int) -> Message:
        self.bad += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        payload = bad_payload(
            kind,
            device_id=self.device_id,
            ts_ms=now,
            seq=self.seq + 1,
            values=self.signals.peek(now),
            fw=self.signals.fw,
        )
        return payload, 0, kind, False, 0

    def _valid(self, now: int, extreme: bool) -> Message:
        """``samples_per_message`` samples (faults drawn per sample); ``extreme``: their
        values are the largest doubles instead of the device's signals."""
        ratios = self._ratios
        draw = self._faults.next
        k = self._k
        fw = self.signals.fw
        late = 0
        samples: list[dict[str, Any]] = []
        for _ in range(k):
            if ratios.late and draw() < ratios.late:
                ts = self._late_ts(now, draw)
                late += 1
            else:
                ts = self._on_time_ts(now, len(samples))
            self.seq += 1
            step = self.signals.step(ts)  # advanced either way: the signals stay the same
            t, h, b, r = EXTREME_VALUES if extreme else step
            samples.append(
                {
                    "ts": ts,
                    "seq": self.seq,
                    "temperature": t,
                    "humidity": h,
                    "battery": b,
                    "rssi": r,
                    "fw": fw,
                }
            )
        self.late += late
        if self._encode is not None:
            payload = self._encode(self.device_id, samples)
        else:
            payload = orjson.dumps(samples[0] if k == 1 else samples)
        duplicate = bool(ratios.duplicate) and draw() < ratios.duplicate
        if duplicate:
            self.duplicates += 1
        return payload, k, None, duplicate, late

    def _late_ts(self, now: int, draw: Callable[[], float]) -> int:
        offset = LATE_MIN_MS + int(draw() * (LATE_MAX_MS - LATE_MIN_MS))
        ts = min(now - offset, self._late_floor - 1)
        self._late_floor = ts
        return ts

    def _on_time_ts(self, now: int, j: int) -> int:
        ts = round(now - (self._k - 1 - j) * self._spacing_ms)
        if ts <= self._last_ts:
            ts = self._last_ts + 1
        self._last_ts = ts
        return ts
