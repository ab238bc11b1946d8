"""PostgreSQL binary COPY data for ``points`` and ``text_points``, built in one pass.

asyncpg's ``copy_records_to_table`` encodes each value through its generic codecs (a
``timestamptz`` alone costs a time-zone conversion and a ``timedelta`` per value): about 1.7 us
per reading on this project's benchmark machine, a fifth of a worker's CPU. A row is a series id
(int4, resolved by ingest.flow.series, one per row), a timestamp and a value; the readings of a
message share their timestamp, so this encoder converts it once per message and packs each row
with one ``struct`` call: about half the cost.

Format (PostgreSQL docs, "COPY", binary format): a signature and two zero int32s, then per
row an int16 field count and per field an int32 length and the value in network order; an int16
-1 ends the data. ``integer`` is an int32, ``text`` its UTF-8 bytes, ``timestamptz`` int64 microseconds since
2000-01-01 00:00 UTC, ``double precision`` an IEEE 754 double.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.model import Reading, TextReading

__all__ = [
    "POINT_COLUMNS",
    "STAGED_COLUMNS",
    "PointsCopy",
    "Rollups",
    "TextRollups",
    "TextsCopy",
    "encode_points",
    "encode_staged",
    "encode_texts",
    "holds_huge",
]

#: The columns of ``points`` and ``text_points`` the data fills, in order. ``batch`` is sent
#: with every row rather than left to its column default, which PostgreSQL would evaluate per
#: row (``current_setting``, a cast): about 0.2 us a row, a third of a plain insert.
POINT_COLUMNS = ("series_id", "ts", "value", "batch")
#: The columns of ``dashboard_staged`` that :func:`encode_staged` fills, in order.
STAGED_COLUMNS = (
    "batch", "series_id", "bucket", "n", "sum", "min", "max", "last_ts", "last_value", "last_text"
)  # fmt: skip

#: Per series and UTC minute of numeric readings, keyed ``minute << 32 | series_id`` (an int:
#: no tuple made per row): ``[n, sum, min, max, newest ts in us, its value]``.
Rollups = dict[int, list[Any]]
#: Per series of text readings: ``[n, newest ts in us, its UTF-8 bytes]``.
TextRollups = dict[int, list[Any]]

#: Values this large or larger are summed in numeric, not as doubles, by the dashboard fold
#: (ingest.db.dashboard); below it, 2**53 of them cannot overflow a double.
HUGE = 1e290

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_TRAILER = b"\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_MINUTE_US = 60_000_000
_SERIES_MASK = (1 << 32) - 1
# 4 fields; length 4, series id (int4); length 8, ts; length 8, value; length 8, batch
_POINT = struct.Struct("!hiiiqidiq")
# 4 fields; length 4, series id; length 8, ts; then the text's length (its bytes follow)
_TEXT_HEAD = struct.Struct("!hiiiqi")
_TEXT_TAIL = struct.Struct("!iq")  # length 8, batch
# 10 fields: batch, series id, bucket, n, sum, min, max, last_ts, last_value, last_text NULL
_STAGED = struct.Struct("!hiqiiiqiiidididiqidi")
# the same for a text series: bucket, sum, min, max and last_value NULL, then last_text's
# length (its bytes follow)
_STAGED_TEXT = struct.Struct("!hiqiiiiiiiiiqii")


class PointsCopy:
    """The COPY ... (FORMAT binary) data of numeric rows for :data:`POINT_COLUMNS`, built a
    chunk at a time (:meth:`add`; the writer lets the loop turn between chunks), each row's
    device and metric replaced by its series id, stored by write ``batch``; and their
    :data:`Rollups`, computed in the same pass (what the dashboard fold needs of them, when
    every row is inserted)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.rollups: Rollups = {}
        self._out = bytearray(_HEADER)
        self._last_ts: datetime | None = None
        self._micros = self._minute = 0

    def add(self, rows: Iterable[Reading], ids: Iterable[int]) -> None:
        """Append ``rows`` (``ids``: one per row, in order, ingest.flow.series.resolve)."""
        out, batch = self._out, self.batch
        pack = _POINT.pack
        rollups = self.rollups
        get = rollups.get
        last_ts, micros, minute = self._last_ts, self._micros, self._minute
        for (_, _, ts, value), series_id in zip(rows, ids, strict=True):
            if ts is not last_ts:  # the readings of a message share their datetime object
                last_ts = ts
                micros = (ts - _PG_EPOCH) // _ONE_US
                minute = micros // _MINUTE_US << 32
            out += pack(4, 4, series_id, 8, micros, 8, value, 8, batch)
            rollup = get(minute | series_id)
            if rollup is None:
                rollups[minute | series_id] = [1, value, value, value, micros, value]
                continue
            rollup[0] += 1
            rollup[1] += value
            if value < rollup[2]:
                rollup[2] = value
            elif value > rollup[3]:
                rollup[3] = value
            if micros > rollup[4]:
                rollup[4] = micros
                rollup[5] = value
        self._last_ts, self._micros, self._minute = last_ts, micros, minute

    def data(self) -> bytes:
        """The whole COPY data of the rows added."""
        return _finished(self._out)


class TextsCopy:
    """As :class:`PointsCopy`, for text values (their UTF-8 bytes), with :data:`TextRollups`.
    :meth:`add` raises ``UnicodeEncodeError`` for a value PostgreSQL could not hold (a lone
    surrogate), as asyncpg's encoder does; a NUL character is left to the server to refuse."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.rollups: TextRollups = {}
        self._out = bytearray(_HEADER)

    def add(self, rows: Iterable[TextReading], ids: Iterable[int]) -> None:
        out = self._out
        pack = _TEXT_HEAD.pack
        tail = _TEXT_TAIL.pack(8, self.batch)
        rollups = self.rollups
        for (_, _, ts, value), series_id in zip(rows, ids, strict=True):
            raw = value.encode()
            micros = (ts - _PG_EPOCH) // _ONE_US
            out += pack(4, 4, series_id, 8, micros, len(raw))
            out += raw
            out += tail
            rollup = rollups.get(series_id)
            if rollup is None:
                rollups[series_id] = [1, micros, raw]
                continue
            rollup[0] += 1
            if micros > rollup[1]:
                rollup[1] = micros
                rollup[2] = raw

    def data(self) -> bytes:
        return _finished(self._out)


def _finished(out: bytearray) -> bytes:
    out += _TRAILER
    try:
        return bytes(out)
    finally:
        del out[-len(_TRAILER) :]


def encode_points(rows: Iterable[Reading], ids: Iterable[int], batch: int) -> tuple[bytes, Rollups]:
    """:class:`PointsCopy` of ``rows`` in one go: their COPY data and rollups."""
    copy = PointsCopy(batch)
    copy.add(rows, ids)
    return copy.data(), copy.rollups


def encode_texts(
    rows: Iterable[TextReading], ids: Iterable[int], batch: int
) -> tuple[bytes, TextRollups]:
    """:class:`TextsCopy` of ``rows`` in one go: their COPY data and rollups."""
    copy = TextsCopy(batch)
    copy.add(rows, ids)
    return copy.data(), copy.rollups


def holds_huge(rollups: Rollups) -> bool:
    """Whether a value of ``rollups`` is one the fold sums in numeric (:data:`HUGE`): its
    batch's sums are then left to the server."""
    return any(r[2] <= -HUGE or r[3] >= HUGE for r in rollups.values())


def encode_staged(batch: int, rollups: Rollups, texts: TextRollups) -> bytes:
    """The COPY ... (FORMAT binary) data of ``dashboard_staged`` (:data:`STAGED_COLUMNS`) for
    write ``batch``: a row per series and minute of ``rollups``, a row per series of
    ``texts``."""
    out = bytearray(_HEADER)
    pack = _STAGED.pack
    for key, (n, total, low, high, last, value) in rollups.items():
        bucket = (key >> 32) * _MINUTE_US
        out += pack(
            10, 8, batch, 4, key & _SERIES_MASK, 8, bucket, 4, n, 8, total, 8, low,
            8, high, 8, last, 8, value, -1,
        )  # fmt: skip
    pack_text = _STAGED_TEXT.pack
    for series_id, (count, newest, raw) in texts.items():
        out += pack_text(
            10, 8, batch, 4, series_id, -1, 4, count, -1, -1, -1, 8, newest, -1, len(raw)
        )  # fmt: skip
        out += raw
    out += _TRAILER
    return bytes(out)
