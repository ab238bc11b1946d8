"""The binary COPY encoder's layout (the database round trip is in
tests/integration/flow/test_writer.py)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ingest.flow.pgcopy import encode_readings
from ingest.model import Reading

HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)


def test_empty() -> None:
    assert encode_readings([]) == HEADER + b"\xff\xff"


def test_row_layout() -> None:
    ts = datetime(2000, 1, 1, 0, 0, 1, 5, tzinfo=UTC)
    data = encode_readings([Reading("dé", "m", ts, -2.5)])
    row = (
        b"\x00\x04"
        + struct.pack("!i", 3) + "dé".encode()
        + struct.pack("!i", 1) + b"m"
        + struct.pack("!iq", 8, 1_000_005)
        + struct.pack("!id", 8, -2.5)
    )  # fmt: skip
    assert data == HEADER + row + b"\xff\xff"


def test_each_row_gets_its_own_timestamp() -> None:
    # Consecutive rows share an encoding only when they share the datetime object; equal
    # values in other time zones and later rows must still be encoded for themselves.
    t1 = datetime(2024, 1, 1, tzinfo=UTC)
    t2 = datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))  # == t1
    t3 = t1 + timedelta(microseconds=1)
    rows = [Reading("d", "a", t1, 1), Reading("d", "a", t2, 1.0), Reading("d", "b", t3, 1.0)]
    data = encode_readings(rows)
    row = 2 + 5 + 5 + 12 + 12
    stamps = [
        struct.unpack_from("!q", data, len(HEADER) + i * row + 2 + 5 + 5 + 4)[0] for i in range(3)
    ]
    base = (t1 - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert stamps == [base, base, base + 1]


def test_a_name_postgres_cannot_hold_raises_like_asyncpg() -> None:
    with pytest.raises(UnicodeEncodeError):
        encode_readings([Reading("d", "\ud800", datetime(2024, 1, 1, tzinfo=UTC), 1.0)])
