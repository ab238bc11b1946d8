"""Sparkplug births kept in the database (table ``sparkplug_births``, docs/design.md,
"Sparkplug B"): written with the batch that holds them, read back when a daemon starts, so
its alias tables hold what its births declared before the broker hands it their data.

The decoder marks a birth by the raw payload in its ``DeviceUpdate.birth``; the writer stores
the newest birth of each device of a batch (``newest_births``, ``store_births``), and the
source feeds them back through the decoder at start (``load_births``, oldest first: a node's
birth forgets the device births that came before it).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

from ingest.formats.decode import RouteTable, decode
from ingest.formats.limits import DEFAULT_LIMITS, Limits
from ingest.formats.sparkplug import SparkplugState, birth_topic
from ingest.model import DeviceUpdate

__all__ = [
    "Birth",
    "decode_births",
    "load_births",
    "newest_births",
    "restore_births",
    "store_births",
]


class _Conn(Protocol):
    async def execute(self, query: str, *args: Any) -> str: ...

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


class Birth(NamedTuple):
    device_id: str
    born_at: datetime
    payload: bytes


# A redelivered birth, or the copy another worker writes, leaves a newer row as it is.
_STORE_SQL: Final = """
    INSERT INTO sparkplug_births AS b (device_id, born_at, payload)
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bytea[]) ORDER BY 1
    ON CONFLICT (device_id) DO UPDATE
        SET born_at = excluded.born_at, payload = excluded.payload, received_at = now()
        WHERE excluded.born_at > b.born_at
"""
_BEFORE_ALL: Final = datetime(1, 1, 1, tzinfo=UTC)
_PAGE: Final = 1000
_LOAD_SQL: Final = """
    SELECT device_id, born_at, payload FROM sparkplug_births
    WHERE (born_at, device_id) > ($1, $2)
    ORDER BY born_at, device_id LIMIT $3
"""


def newest_births(updates: Iterable[DeviceUpdate]) -> list[Birth]:
    """The newest birth of each device among ``updates`` (receive order breaks ties), sorted
    by device: the order the rows are locked in, as for every write of the batch."""
    newest: dict[str, Birth] = {}
    for u in updates:
        if u.birth is None or u.status_at is None:
            continue
        known = newest.get(u.device_id)
        if known is None or u.status_at >= known.born_at:
            newest[u.device_id] = Birth(u.device_id, u.status_at, u.birth)
    return [newest[d] for d in sorted(newest)]


async def store_births(conn: _Conn, births: list[Birth]) -> None:
    """Store ``births`` in the caller's (the batch's) transaction."""
    await conn.execute(
        _STORE_SQL,
        [b.device_id for b in births],
        [b.born_at for b in births],
        [b.payload for b in births],
    )


async def load_births(conn: _Conn, after: Birth | None, limit: int) -> list[Birth]:
    """The next ``limit`` births after ``after`` (None: from the oldest), oldest first."""
    since = (after.born_at, after.device_id) if after is not None else (_BEFORE_ALL, "")
    rows = await conn.fetch(_LOAD_SQL, since[0], since[1], limit)
    return [Birth(r["device_id"], r["born_at"], bytes(r["payload"])) for r in rows]


def decode_births(
    births: Iterable[Birth], routes: RouteTable, limits: Limits = DEFAULT_LIMITS
) -> None:
    """Decode each birth again, at its own time: only the routes' alias tables keep anything
    (their readings were stored when the births arrived)."""
    for birth in births:
        decode(birth_topic(birth.device_id), birth.payload, birth.born_at, routes, limits=limits)


async def restore_births(conn: _Conn, routes: RouteTable, limits: Limits = DEFAULT_LIMITS) -> int:
    """For the operator tools (``ingest replay``, ``ingest audit``): the stored births decoded
    into ``routes`` on the loop, so data by alias decodes; returns how many. Nothing without a
    sparkplug route. The daemon's source does the same in a worker thread."""
    if not any(isinstance(s, SparkplugState) for s in routes.states):
        return 0
    restored = 0
    after: Birth | None = None
    while True:
        births = await load_births(conn, after, _PAGE)
        decode_births(births, routes, limits)
        restored += len(births)
        if len(births) < _PAGE:
            return restored
        after = births[-1]
