"""Malformed payloads, one generator per kind, each malformed in exactly one way.

The daemon must turn each of them into a dead letter (DESIGN.md, Payloads): a malformed
message is stored whole as a dead letter, never as readings. None of them carries a ``seq``
field that a decoder could read, and they do not consume a sequence number: the device's
valid samples keep contiguous ``seq`` values, so an audit finds ``dead letters == bad``.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

#: The kinds of ``--bad-ratio`` payloads, in the order the report lists them.
BAD_KINDS = ("not_json", "truncated_json", "invalid_utf8", "no_numeric", "bad_ts")

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
    # Parses, but there is nothing to store: no ts and no numeric field.
    return orjson.dumps({"device": device_id, "fw": fw, "status": "ok", "note": None})


def _bad_ts(device_id: str, ts_ms: int, seq: int, values: Values, fw: str) -> bytes:
    t, h, b, r = values
    return orjson.dumps(
        {"ts": UNREADABLE_TS, "temperature": t, "humidity": h, "battery": b, "rssi": r, "fw": fw}
    )


_GENERATORS: dict[str, Callable[[str, int, int, Values, str], bytes]] = {
    "not_json": _not_json,
    "truncated_json": _truncated_json,
    "invalid_utf8": _invalid_utf8,
    "no_numeric": _no_numeric,
    "bad_ts": _bad_ts,
}


def bad_payload(
    kind: str, *, device_id: str, ts_ms: int, seq: int, values: Values, fw: str
) -> bytes:
    """A malformed payload of ``kind`` (one of :data:`BAD_KINDS`) with plausible content."""
    return _GENERATORS[kind](device_id, ts_ms, seq, values, fw)
