"""The binary COPY encoders' layout (the database round trip is in
tests/integration/flow/test_writer.py)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ingest.flow.pgcopy import (
    PointsCopy,
    TextsCopy,
    encode_points,
    encode_staged,
    encode_texts,
    holds_huge,
)
from ingest.model import Reading, TextReading

HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)


def test_empty() -> None:
    assert encode_points([], [], 1) == (HEADER + b"\xff\xff", {})
    assert encode_texts([], [], 1) == (HEADER + b"\xff\xff", {})


def test_row_layout_is_an_int4_series_id_a_timestamp_and_a_double() -> None:
    ts = datetime(2000, 1, 1, 0, 0, 1, 5, tzinfo=UTC)
    data, _ = encode_points([Reading("dé", "m", ts, -2.5)], [7], 42)
    row = (
        b"\x00\x04"
        + struct.pack("!ii", 4, 7)
        + struct.pack("!iq", 8, 1_000_005)
        + struct.pack("!id", 8, -2.5)
        + struct.pack("!iq", 8, 42)
    )  # fmt: skip
    assert data == HEADER + row + b"\xff\xff"


def test_text_row_layout() -> None:
    ts = datetime(2000, 1, 1, 0, 0, 1, tzinfo=UTC)
    data, _ = encode_texts([TextReading("dé", "m", ts, "ouvert é")], [7], 42)
    raw = "ouvert é".encode()
    row = (
        b"\x00\x04"
        + struct.pack("!ii", 4, 7)
        + struct.pack("!iq", 8, 1_000_000)
        + struct.pack("!i", len(raw)) + raw
        + struct.pack("!iq", 8, 42)
    )  # fmt: skip
    assert data == HEADER + row + b"\xff\xff"


def test_each_row_gets_its_own_timestamp_and_series() -> None:
    # Consecutive rows share an encoding only when they share the datetime object; equal
    # values in other time zones and later rows must still be encoded for themselves.
    t1 = datetime(2024, 1, 1, tzinfo=UTC)
    t2 = datetime(2024, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))  # == t1
    t3 = t1 + timedelta(microseconds=1)
    rows = [Reading("d", "a", t1, 1), Reading("d", "a", t2, 1.0), Reading("dé", "m", t3, 1.0)]
    data, _ = encode_points(rows, [1, 1, 7], 1)
    row = 2 + 8 + 12 + 12 + 12
    fields = [struct.unpack_from("!iiiq", data, len(HEADER) + i * row + 2) for i in range(3)]
    base = (t1 - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert [(f[1], f[3]) for f in fields] == [(1, base), (1, base), (7, base + 1)]


def test_an_id_missing_for_a_row_is_an_error_not_a_short_copy() -> None:
    with pytest.raises(ValueError):
        encode_points([Reading("d", "a", datetime(2024, 1, 1, tzinfo=UTC), 1.0)], [], 1)


def test_a_text_postgres_cannot_hold_raises_like_asyncpg() -> None:
    with pytest.raises(UnicodeEncodeError):
        encode_texts([TextReading("d", "a", datetime(2024, 1, 1, tzinfo=UTC), "\ud800")], [1], 1)


def test_rollups_per_series_and_minute_and_the_newest_of_each() -> None:
    t0 = datetime(2000, 1, 1, 0, 1, tzinfo=UTC)  # minute 1 since 2000
    rows = [
        Reading("d", "a", t0 + timedelta(seconds=5), 3.0),
        Reading("d", "a", t0, 1.0),  # older, later in the batch: not the newest
        Reading("d", "a", t0 + timedelta(seconds=70), 9.0),  # the next minute
        Reading("d", "b", t0, -2.0),
    ]
    _, rollups = encode_points(rows, [1, 1, 1, 2], 1)
    second = 60_000_000
    assert rollups == {
        1 << 32 | 1: [2, 4.0, 1.0, 3.0, second + 5_000_000, 3.0],
        2 << 32 | 1: [1, 9.0, 9.0, 9.0, 2 * second + 10_000_000, 9.0],
        1 << 32 | 2: [1, -2.0, -2.0, -2.0, second, -2.0],
    }
    assert not holds_huge(rollups)
    assert holds_huge(encode_points([Reading("d", "a", t0, -1e300)], [1], 1)[1])
    _, texts = encode_texts(
        [TextReading("d", "s", t0, "new"), TextReading("d", "s", t0 - timedelta(1), "old")],
        [5, 5],
        1,
    )
    assert texts == {5: [2, second, b"new"]}


def test_chunks_add_up_to_the_whole() -> None:
    # The writer adds a batch a chunk at a time; a chunk may split a message's readings (which
    # share one datetime object) and a series' minute.
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    stamps = [t0 + timedelta(seconds=7 * i) for i in range(40)]
    rows = [Reading("d", m, ts, float(i % 11)) for i, ts in enumerate(stamps) for m in "abc"]
    ids = [ord(r.metric) for r in rows]
    texts = [TextReading("d", "s", ts, f"v{i}") for i, ts in enumerate(stamps)]
    points, words = PointsCopy(9), TextsCopy(9)
    for start in range(0, len(rows), 7):
        points.add(rows[start : start + 7], ids[start : start + 7])
    for start in range(0, len(texts), 3):
        words.add(texts[start : start + 3], [5] * len(texts[start : start + 3]))
    assert (points.data(), points.rollups) == encode_points(rows, ids, 9)
    assert (words.data(), words.rollups) == encode_texts(texts, [5] * len(texts), 9)
    assert points.data() == points.data()  # asking twice gives the same data


def test_staged_row_layout() -> None:
    data = encode_staged(42, {3 << 32 | 7: [2, 4.0, 1.0, 3.0, 5, 3.0]}, {8: [1, 6, b"on"]})
    numeric = (
        b"\x00\x0a"
        + struct.pack("!iq", 8, 42) + struct.pack("!ii", 4, 7)
        + struct.pack("!iq", 8, 3 * 60_000_000) + struct.pack("!ii", 4, 2)
        + struct.pack("!id", 8, 4.0) + struct.pack("!id", 8, 1.0) + struct.pack("!id", 8, 3.0)
        + struct.pack("!iq", 8, 5) + struct.pack("!id", 8, 3.0) + struct.pack("!i", -1)
    )  # fmt: skip
    text = (
        b"\x00\x0a"
        + struct.pack("!iq", 8, 42) + struct.pack("!ii", 4, 8) + struct.pack("!i", -1)
        + struct.pack("!ii", 4, 1) + struct.pack("!iii", -1, -1, -1)
        + struct.pack("!iq", 8, 6) + struct.pack("!i", -1) + struct.pack("!i", 2) + b"on"
    )  # fmt: skip
    assert data == HEADER + numeric + text + b"\xff\xff"
