"""Series ids and device updates for the writer (docs/design.md, "Database").

:class:`SeriesCache` maps ``(device_id, metric)`` to the integer id of its ``series`` row, so
that a batch is written as narrow ``(series_id, ts, value)`` rows. Per device it holds a small
dict of metric -> id (metric names interned: a fleet repeats a handful of them), except for a
device of one series so far, which holds a single int instead: the id and a code of the metric
name packed together (a dict of one entry cost 184 bytes, two thirds of such a series). Measured
(benchmarks/series_cache.py, device strings included): about 120 bytes a series for devices of
one metric and 90 for devices of five. Bounded by ``INGEST_SERIES_CACHE_SIZE`` series; when
full, the devices cached longest ago are dropped whole (their series counted in
:attr:`SeriesCache.evicted`) and looked up again when they next send.

:func:`resolve` finds the ids of a batch, one per row in row order: from the cache, else from
``series``, else it creates the missing series in bulk (``INSERT ... ON CONFLICT DO NOTHING`` in
key order, so workers racing on the same new series take their locks in one order and never
deadlock) and reads them back. This runs in its own short transactions, before the batch's: a
series, once cached, is committed, so a rolled-back batch never leaves the cache pointing at
nothing. A series whose message is then rejected stays, with no points (harmless).

:class:`DeviceMemory` remembers, bounded likewise, what the writer last stored of each device's
tags, status and units, so a fleet whose every message repeats its tags costs nothing per
batch: :meth:`DeviceMemory.plan` keeps only what changed.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final, Protocol

import orjson

from ingest.flow.births import Birth, newest_births, store_births
from ingest.model import DeviceUpdate

__all__ = [
    "ROWS_BETWEEN_TURNS",
    "DeviceMemory",
    "DevicePlan",
    "SeriesCache",
    "apply_plan",
    "chunks",
    "resolve",
]

#: Rows looked up, checked, cached or encoded (by the writer) between two turns of the other
#: tasks: a batch holding a message of thousands of readings must not keep the event loop long.
ROWS_BETWEEN_TURNS = 2048


def chunks(rows: int) -> Iterable[tuple[int, int]]:
    """``(start, end)`` of each run of :data:`ROWS_BETWEEN_TURNS` rows out of ``rows``."""
    step = ROWS_BETWEEN_TURNS
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


# A device of one series is cached as (series id << _CODE_BITS) | the code of its metric name;
# past _CODE_BITS distinct names such devices get a dict, as the others.
_CODE_BITS: Final = 16
_CODE_MASK: Final = (1 << _CODE_BITS) - 1
_NOTHING: Final[Mapping[str, int]] = MappingProxyType({})


class _Conn(Protocol):
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def execute(self, query: str, *args: Any) -> str: ...


class SeriesCache:
    """``(device_id, metric)`` -> series id, at most ``capacity`` entries (module docstring)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self._capacity = capacity
        # device -> {metric: id}, or an int for a device of one series (_CODE_BITS)
        self._devices: dict[str, dict[str, int] | int] = {}
        self._codes: dict[str, int] = {}  # metric name -> its code, and back
        self._names: list[str] = []
        self._size = 0
        #: Series dropped to make room.
        self.evicted = 0

    def __len__(self) -> int:
        return self._size

    def get(self, device_id: str, metric: str) -> int | None:
        ids, _ = self.lookup([(device_id, metric)])
        return ids[0] or None

    def add(self, device_id: str, metric: str, series_id: int) -> None:
        metric = sys.intern(metric)
        entry = self._devices.get(device_id)
        if entry is None:
            while self._size >= self._capacity and self._devices:
                self._evict_oldest()
            code = self._code(metric)
            self._devices[device_id] = (
                {metric: series_id} if code is None else series_id << _CODE_BITS | code
            )
            self._size += 1
            return
        if isinstance(entry, int):
            name = self._names[entry & _CODE_MASK]
            if name == metric:
                self._devices[device_id] = series_id << _CODE_BITS | entry & _CODE_MASK
                return
            entry = self._devices[device_id] = {name: entry >> _CODE_BITS}
        if metric not in entry:
            self._size += 1
        entry[metric] = series_id

    def lookup(self, keys: Iterable[Sequence[Any]]) -> tuple[list[int], list[int]]:
        """The ids of ``keys`` (rows whose first two fields are device_id and metric), one per
        row, and the positions of those the cache lacks (0 there). The writer's hot path, once
        per reading: the device is looked up once per run of rows of one device (a message),
        then a probe of its small dict or a comparison; no object made per row."""
        ids: list[int] = []
        holes: list[int] = []
        append = ids.append
        devices = self._devices
        last: str | None = None
        metrics: Mapping[str, int] = _NOTHING
        only: str | None = None  # the metric of a device of one series
        only_id = 0
        for row in keys:
            device_id = row[0]
            if device_id is not last:
                last = device_id
                entry = devices.get(device_id, _NOTHING)
                if isinstance(entry, int):
                    only, only_id = self._names[entry & _CODE_MASK], entry >> _CODE_BITS
                else:
                    only, metrics = None, entry
            if only is None:
                try:
                    append(metrics[row[1]])
                    continue
                except KeyError:
                    pass
            elif row[1] == only:
                append(only_id)
                continue
            holes.append(len(ids))
            append(0)
        return ids, holes

    def _code(self, metric: str) -> int | None:
        code = self._codes.get(metric)
        if code is None and len(self._names) <= _CODE_MASK:
            code = self._codes[metric] = len(self._names)
            self._names.append(metric)
        return code

    def _evict_oldest(self) -> None:
        entry = self._devices.pop(next(iter(self._devices)))
        dropped = 1 if isinstance(entry, int) else len(entry)
        self._size -= dropped
        self.evicted += dropped


_SELECT_SERIES_SQL = """
    SELECT s.id, s.device_id, s.metric FROM series s
    JOIN (SELECT k->>0 AS device_id, k->>1 AS metric FROM json_array_elements($1::json) k) k
      ON s.device_id = k.device_id AND s.metric = k.metric
"""
# In key order (the server's collation, the same for every worker): concurrent creators of the
# same series wait for each other in one order, never in a cycle.
_CREATE_SERIES_SQL = """
    INSERT INTO series (device_id, metric)
    SELECT k->>0, k->>1 FROM json_array_elements($1::json) k
    ORDER BY 1, 2
    ON CONFLICT (device_id, metric) DO NOTHING
    RETURNING id, device_id, metric
"""


async def resolve(
    conn: _Conn, cache: SeriesCache, keys: Sequence[Sequence[Any]]
) -> tuple[list[int], int]:
    """The series ids of ``keys`` (rows whose first two fields are device_id and metric: readings,
    text readings, (device_id, metric) pairs), one per row in row order, and how many series
    were created. Outside any transaction of the caller's: each statement commits on its own."""
    ids, holes = await _lookup(cache, keys)
    if not holes:
        return ids, 0
    missing = {(keys[i][0], keys[i][1]) for i in holes}
    for n, (device_id, metric) in enumerate(missing, 1):
        # UnicodeEncodeError for a name PostgreSQL cannot hold (a lone surrogate), as the COPY
        # encoder raises it: the message becomes a dead letter that says so.
        device_id.encode()
        metric.encode()
        if n % ROWS_BETWEEN_TURNS == 0:
            await asyncio.sleep(0)
    found: dict[tuple[str, str], int] = {}

    def _found(rows: Iterable[Any]) -> int:
        for row in rows:
            found[row["device_id"], row["metric"]] = row["id"]
        return len(found)

    def _pairs() -> str:
        # The pairs as one JSON text: asyncpg encodes a text[] argument element by element in
        # the loop, ~10 us a name, where orjson takes well under one.
        return orjson.dumps(list(missing.difference(found))).decode()

    created = 0
    if _found(await conn.fetch(_SELECT_SERIES_SQL, _pairs())) < len(missing):
        # The insert returns the series it created: only those another worker created
        # meanwhile (its conflicts) are read back, not every new one.
        inserted = await conn.fetch(_CREATE_SERIES_SQL, _pairs())
        created = len(inserted)
        if _found(inserted) < len(missing):
            _found(await conn.fetch(_SELECT_SERIES_SQL, _pairs()))
    if len(found) < len(missing):  # a series deleted by hand between the insert and the select
        raise LookupError(f"series of {sorted(missing.difference(found))[:3]} vanished")
    # The batch's own strings go into the cache: the readings of a message share one device
    # string, and so do its series there.
    for n, key in enumerate(missing, 1):
        cache.add(key[0], key[1], found[key])
        if n % ROWS_BETWEEN_TURNS == 0:
            await asyncio.sleep(0)
    for i in holes:
        ids[i] = found[keys[i][0], keys[i][1]]
    return ids, created


async def _lookup(cache: SeriesCache, keys: Sequence[Sequence[Any]]) -> tuple[list[int], list[int]]:
    """:meth:`SeriesCache.lookup` of ``keys``, giving the other tasks a turn between slices of
    a large batch (one message may hold thousands of readings)."""
    if len(keys) <= ROWS_BETWEEN_TURNS:
        return cache.lookup(keys)
    ids: list[int] = []
    holes: list[int] = []
    for start, end in chunks(len(keys)):
        if start:
            await asyncio.sleep(0)
        part, gaps = cache.lookup(keys[start:end])
        holes.extend([start + i for i in gaps])
        ids.extend(part)
    return ids, holes


@dataclass(slots=True)
class _Known:
    tags: dict[str, str] = field(default_factory=dict)
    status_at: datetime | None = None
    units: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """What a batch's device updates change: per device (sorted) the tags that differ from
    what was stored, the newest status, per series the units that differ, and per device the
    newest Sparkplug birth (``ingest.flow.births``)."""

    devices: list[tuple[str, dict[str, str], str | None, datetime | None]]
    units: list[tuple[str, str, str]]
    births: list[Birth] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.devices or self.units or self.births)


class DeviceMemory:
    """What the writer last stored per device, at most ``capacity`` devices (oldest dropped:
    their next update is written again, which is harmless)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._known: dict[str, _Known] = {}

    def plan(self, updates: Sequence[DeviceUpdate]) -> DevicePlan:
        merged: dict[str, _Known] = {}
        statuses: dict[str, str] = {}
        for update in updates:
            into = merged.setdefault(update.device_id, _Known())
            if update.tags:
                into.tags.update(update.tags)  # in receive order: the newest wins per key
            if update.units:
                into.units.update(update.units)
            if (
                update.status is not None
                and update.status_at is not None
                and (into.status_at is None or update.status_at > into.status_at)
            ):
                into.status_at = update.status_at
                statuses[update.device_id] = update.status
        devices: list[tuple[str, dict[str, str], str | None, datetime | None]] = []
        units: list[tuple[str, str, str]] = []
        for device_id in sorted(merged):
            new = merged[device_id]
            known = self._known.get(device_id) or _Known()
            tags = {k: v for k, v in new.tags.items() if known.tags.get(k) != v}
            status_at = new.status_at
            if status_at is not None and known.status_at is not None:
                status_at = status_at if status_at > known.status_at else None
            if tags or status_at is not None:
                status = statuses[device_id] if status_at is not None else None
                devices.append((device_id, tags, status, status_at))
            units.extend(
                (device_id, m, u) for m, u in sorted(new.units.items()) if known.units.get(m) != u
            )
        return DevicePlan(devices, units, newest_births(updates))

    def remember(self, plan: DevicePlan) -> None:
        """Called once the batch holding ``plan`` committed."""
        for device_id, tags, _status, status_at in plan.devices:
            known = self._entry(device_id)
            known.tags.update(tags)
            if status_at is not None:
                known.status_at = status_at
        for device_id, metric, unit in plan.units:
            self._entry(device_id).units[sys.intern(metric)] = unit

    def _entry(self, device_id: str) -> _Known:
        known = self._known.get(device_id)
        if known is None:
            while len(self._known) >= self._capacity:
                del self._known[next(iter(self._known))]
            known = self._known[device_id] = _Known()
        return known


# Tags merge per key, the newest wins; a status replaces the stored one only when newer. A
# device first known from such a message gets its row now (last_ts stays NULL until a reading
# of it is folded: ingest.db.dashboard).
_DEVICES_SQL = """
    INSERT INTO devices AS d (device_id, first_seen, last_seen, tags, status, status_at)
    SELECT u.device_id, now(), now(), u.tags::jsonb, u.status, u.status_at
    FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
        AS u (device_id, tags, status, status_at)
    ORDER BY 1
    ON CONFLICT (device_id) DO UPDATE SET
        tags = d.tags || excluded.tags,
        status = CASE WHEN excluded.status_at > d.status_at OR d.status_at IS NULL
                      THEN coalesce(excluded.status, d.status) ELSE d.status END,
        status_at = CASE WHEN excluded.status_at > d.status_at OR d.status_at IS NULL
                         THEN coalesce(excluded.status_at, d.status_at) ELSE d.status_at END
"""
_UNITS_SQL = """
    UPDATE series s SET unit = u.unit
    FROM unnest($1::integer[], $2::text[]) AS u (id, unit)
    WHERE s.id = u.id AND s.unit IS DISTINCT FROM u.unit
"""


async def apply_plan(conn: _Conn, plan: DevicePlan, ids: Mapping[tuple[str, str], int]) -> None:
    """Store ``plan`` in the caller's (the batch's) transaction; ``ids`` holds the series of
    its units by (device_id, metric)."""
    if plan.devices:
        await conn.execute(
            _DEVICES_SQL,
            [d for d, _, _, _ in plan.devices],
            [json.dumps(t, ensure_ascii=False) for _, t, _, _ in plan.devices],
            [s for _, _, s, _ in plan.devices],
            [a for _, _, _, a in plan.devices],
        )
    if plan.units:
        pairs = sorted((ids[d, m], u) for d, m, u in plan.units)
        await conn.execute(_UNITS_SQL, [i for i, _ in pairs], [u for _, u in pairs])
    if plan.births:
        await store_births(conn, plan.births)


def unit_keys(updates: Sequence[DeviceUpdate]) -> list[tuple[str, str]]:
    """The (device_id, metric) of every unit the updates give: their series must exist."""
    return [(u.device_id, m) for u in updates if u.units for m in u.units]
