"""Malformed and hostile payloads, one generator per kind, each bad in exactly one way.

The daemon must turn each of them into a dead letter (docs/design.md, "Routes and payload
formats" and "Limits"): a malformed message is stored whole as a dead letter, never as
readings. None of them carries a ``seq`` field that a decoder could read, and they do not
consume a sequence number: the device's valid samples keep contiguous ``seq`` values, so an
audit finds ``dead letters == bad``.

Two mixes: ``--bad-ratio`` draws from :data:`BAD_KINDS` (broken devices), ``--hostile-ratio``
from :data:`HOSTILE_KINDS` (devices that test the limits). :data:`REASONS` says which dead
letter reason the daemon gives each kind. The hostile ``extreme`` kind is not bad: it is a
valid message whose values are the largest doubles, and it must be stored (``_payloads``).
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

#: The kinds of ``--bad-ratio`` payloads, in the order the report lists them.
BAD_KINDS = ("not_json", "truncated_json", "invalid_utf8", "no_numeric", "bad_ts")

#: The kinds of ``--hostile-ratio`` messages that are dead letters, in report order.
HOSTILE_BAD_KINDS = (
    "oversized",
    "too_many_readings",
    "ts_year_9999",
    "ts_before_2000",
    "control_chars",
)
#: The kinds of ``--bad-ratio`` with ``--format sparkplug`` (``simulators._sparkplug``): an
#: edge node that sends data by aliases it has not declared in a birth yet.
SPARKPLUG_BAD_KINDS = ("before_birth",)

#: A valid hostile message: stored, not a dead letter.
EXTREME = "extreme"
#: What ``--hostile-ratio`` draws from, uniformly.
HOSTILE_KINDS = (*HOSTILE_BAD_KINDS, EXTREME)

#: The dead letter reason the daemon gives each bad kind (its payload contract).
REASONS = {
    "not_json": "not_json",
    "truncated_json": "not_json",
    "invalid_utf8": "invalid_utf8",
    "no_numeric": "no_readings",
    "bad_ts": "bad_ts",
    "oversized": "too_large",
    "too_many_readings": "too_many_readings",
    "ts_year_9999": "ts_out_of_range",
    "ts_before_2000": "ts_out_of_range",
    "control_chars": "bad_metric",
    "before_birth": "unknown_alias",
}

#: The daemon's default limits the hostile kinds go past (INGEST_MAX_PAYLOAD_BYTES,
#: INGEST_MAX_READINGS_PER_MESSAGE).
MAX_PAYLOAD_BYTES = 1 << 20
MAX_READINGS = 10_000
#: How far past the payload limit an oversized message goes.
OVERSIZE_BY = 4096
#: 9999-12-31T23:59:59Z in epoch seconds (read as milliseconds, it would be 1978).
YEAR_9999_S = 253402300799
#: 1999-12-31T23:59:59Z in epoch milliseconds: just before the default INGEST_MIN_TS.
BEFORE_2000_MS = 946684799000
#: The largest finite doubles a device can send (each is stored as it is).
EXTREME_VALUES = (1.7976931348623157e308, -1.7976931348623157e308, 1e308, -1e308)

#: An RFC 3339-looking time no parser accepts (month 13, hour 25).
UNREADABLE_TS = "2024-13-45T25:61:61Z"

Values = tuple[float, float, float, int]


def _not_json(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # What a device speaking line protocol instead of JSON would send.
    t, h, b, r = values
    return f"{device_id} temperature={t},humidity={h},battery={b},rssi={r} {ts_ms}".encode()


def _truncated_json(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # A payload cut short (a buffer flushed too early); any proper prefix of an object is
    # invalid JSON. The ``seq`` in it is never read, so it does not count as sent.
    t, h, b, r = values
    whole = orjson.dumps(
        {
            "ts": ts_ms,
            "seq": seq,
            "temperature": t,
            "humidity": h,
            "battery": b,
            "rssi": r,
            "fw": fw,
        }
    )
    return whole[: len(whole) // 2]


def _invalid_utf8(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # Well-formed JSON structure, but a Latin-1 byte (0xE9) and a stray 0xFF in a string.
    t = values[0]
    return b'{"ts":%d,"temperature":%r,"fw":"%s-caf\xe9\xff"}' % (ts_ms, t, fw.encode())


def _no_numeric(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # Parses, but there is nothing to store: no ts, and no number, boolean or string (a
    # string would be a text reading) but inside lists, which are skipped.
    return orjson.dumps({"device": [device_id], "fw": [fw], "status": [], "note": None})


def _bad_ts(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    t, h, b, r = values
    return orjson.dumps(
        {"ts": UNREADABLE_TS, "temperature": t, "humidity": h, "battery": b, "rssi": r, "fw": fw}
    )


def _oversized(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # Well-formed, and without a size limit it would be stored (the padding string skipped):
    # only the size makes it a dead letter.
    t, h = values[0], values[1]
    head = b'{"ts":%d,"temperature":%r,"humidity":%r,"pad":"' % (ts_ms, t, h)
    tail = b'"}'
    return head + b"x" * (MAX_PAYLOAD_BYTES + OVERSIZE_BY - len(head) - len(tail)) + tail


def _too_many_readings(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # One reading over the limit, every one of them a fine number.
    t = values[0]
    fields = b",".join(b'"ch%05d":%r' % (i, t + i) for i in range(MAX_READINGS + 1))
    return b'{"ts":%d,%s}' % (ts_ms, fields)


def _ts_year_9999(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # Epoch seconds of the last second of year 9999: no unit reading makes it plausible.
    t, h, b, _ = values
    return orjson.dumps({"ts": YEAR_9999_S, "temperature": t, "humidity": h, "battery": b})


def _ts_before_2000(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # A device whose clock was never set (or reset to its factory date).
    t, h, b, _ = values
    return orjson.dumps({"ts": BEFORE_2000_MS, "temperature": t, "humidity": h, "battery": b})


def _control_chars(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    # A terminal escape (clear screen) and a bell in metric names: an operator listing them
    # must never have them acted on.
    t, h, _, r = values
    return orjson.dumps({"ts": ts_ms, "temperature\x1b[2J": t, "humidity\x07": h, "rssi": r})


_GENERATORS: dict[str, Callable[[str, int, int, Values, str], bytes]] = {
    "not_json": _not_json,
    "truncated_json": _truncated_json,
    "invalid_utf8": _invalid_utf8,
    "no_numeric": _no_numeric,
    "bad_ts": _bad_ts,
    "oversized": _oversized,
    "too_many_readings": _too_many_readings,
    "ts_year_9999": _ts_year_9999,
    "ts_before_2000": _ts_before_2000,
    "control_chars": _control_chars,
}


def bad_payload(
    kind: str, *, device_id: str, ts_ms: int, seq: int, values: Values, fw: str
) -> bytes:
    """A bad payload of ``kind`` (one of :data:`BAD_KINDS` or :data:`HOSTILE_BAD_KINDS`)
    with plausible content."""
    return _GENERATORS[kind](device_id, ts_ms, seq, values, fw)
