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

from ingest.model import Reading, TextReading

__all__ = ["POINT_COLUMNS", "encode_points", "encode_texts"]

#: The columns of ``points`` and ``text_points`` the data fills, in order. ``batch`` is sent
#: with every row rather than left to its column default, which PostgreSQL would evaluate per
#: row (``current_setting``, a cast): about 0.2 us a row, a third of a plain insert.
POINT_COLUMNS = ("series_id", "ts", "value", "batch")

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_TRAILER = b"\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
# 4 fields; length 4, series id (int4); length 8, ts; length 8, value; length 8, batch
_POINT = struct.Struct("!hiiiqidiq")
# 4 fields; length 4, series id; length 8, ts; then the text's length (its bytes follow)
_TEXT_HEAD = struct.Struct("!hiiiqi")
_TEXT_TAIL = struct.Struct("!iq")  # length 8, batch


def encode_points(rows: Iterable[Reading], ids: Iterable[int], batch: int) -> bytes:
    """The COPY ... (FORMAT binary) data of ``rows`` for :data:`POINT_COLUMNS`, each row's
    device and metric replaced by its series id (``ids``: one per row, in order,
    ingest.flow.series.resolve), stored by write ``batch``."""
    out = bytearray(_HEADER)
    pack = _POINT.pack
    last_ts: datetime | None = None
    micros = 0
    for (_, _, ts, value), series_id in zip(rows, ids, strict=True):
        if ts is not last_ts:  # the readings of a message share their datetime object
            last_ts = ts
            micros = (ts - _PG_EPOCH) // _ONE_US
        out += pack(4, 4, series_id, 8, micros, 8, value, 8, batch)
    out += _TRAILER
    return bytes(out)


def encode_texts(rows: Iterable[TextReading], ids: Iterable[int], batch: int) -> bytes:
    """As :func:`encode_points`, for text values (their UTF-8 bytes). Raises
    ``UnicodeEncodeError`` for a value PostgreSQL could not hold (a lone surrogate), as
    asyncpg's encoder does; a NUL character is left to the server to refuse."""
    out = bytearray(_HEADER)
    pack = _TEXT_HEAD.pack
    tail = _TEXT_TAIL.pack(8, batch)
    for (_, _, ts, value), series_id in zip(rows, ids, strict=True):
        raw = value.encode()
        out += pack(4, 4, series_id, 8, (ts - _PG_EPOCH) // _ONE_US, len(raw))
        out += raw
        out += tail
    out += _TRAILER
    return bytes(out)
