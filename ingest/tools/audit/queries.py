"""The scans of the database: readings per device, ``seq`` gaps, dead letters."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, TextIO

import anyio
import asyncpg

from ingest.formats.decode import TopicTemplate, decode
from ingest.model import Decoded
from ingest.tools.audit.output import Progress
from ingest.tools.audit.reconcile import reconcile
from ingest.tools.audit.results import AuditResult, DeviceAudit, SeqStats
from ingest.tools.audit.simulator_report import SimReport

__all__ = ["FIRST_GAPS", "SEQ_METRIC", "audit"]

#: Gap ranges listed per device (all of them are counted).
FIRST_GAPS: Final = 5

SEQ_METRIC: Final = "seq"


class _Where:
    """A WHERE clause built from the options given, with numbered parameters."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def add(self, sql: str, *args: Any) -> _Where:
        for arg in args:
            self.args.append(arg)
            sql = sql.replace("?", f"${len(self.args)}", 1)
        self.parts.append(sql)
        return self

    def window(self, column: str, since: datetime | None, until: datetime | None) -> _Where:
        if since is not None:
            self.add(f"{column} >= ?", since)
        if until is not None:
            self.add(f"{column} < ?", until)
        return self

    def sql(self) -> str:
        return ("WHERE " + " AND ".join(self.parts)) if self.parts else ""


# Distinct timestamps through a hash aggregate on (device_id, ts): count(DISTINCT ts) would sort
# every row, or walk the primary key index with a heap fetch per row while the visibility map
# lags behind an insert-only table (20 s instead of 3 s for 5 million rows here).
_SAMPLES_SQL = """
    SELECT device_id, sum(n)::bigint AS rows, count(*) AS samples
    FROM (SELECT device_id, ts, count(*) AS n FROM readings {where} GROUP BY device_id, ts) s
    GROUP BY device_id
"""

# One sort of the seq rows (the window function) and one aggregate over its output: gaps are
# where a value is more than one above the previous. Values that are not integers (or do not
# fit a bigint) are not sequence numbers and are left out.
_SEQ_SQL = """
    SELECT device_id, min(seq) AS first, max(seq) AS last, count(*) AS rows,
           count(*) FILTER (WHERE seq = prev) AS repeats,
           count(*) FILTER (WHERE seq > prev + 1) AS gaps,
           coalesce(sum(seq - prev - 1) FILTER (WHERE seq > prev + 1), 0)::bigint AS missing,
           (array_agg(prev + 1 ORDER BY seq) FILTER (WHERE seq > prev + 1))[1:{first_gaps}]
               AS firsts,
           (array_agg(seq - 1 ORDER BY seq) FILTER (WHERE seq > prev + 1))[1:{first_gaps}]
               AS lasts
    FROM (
        SELECT device_id, value::bigint AS seq,
               lag(value::bigint) OVER (PARTITION BY device_id ORDER BY value) AS prev
        FROM readings {where}
    ) s
    GROUP BY device_id
"""

#: Memory for the sorts and hash tables of these one-off queries (SET LOCAL, this session only).
WORK_MEM: Final = "64MB"

_DEAD_LETTERS_SQL = "SELECT topic, payload, received_at, reason FROM dead_letters {where}"

# Which samples of decodable dead letters are not in readings: one primary-key probe each.
_ABSENT_SQL = """
    SELECT u.device_id, u.ts, u.seq
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) AS u(device_id, metric, ts, seq)
    WHERE NOT EXISTS (
        SELECT 1 FROM readings r
        WHERE r.device_id = u.device_id AND r.metric = u.metric AND r.ts = u.ts
    )
"""


async def audit(
    dsn: str | None,
    *,
    template: TopicTemplate,
    since: datetime | None = None,
    until: datetime | None = None,
    devices: Sequence[str] = (),
    report: SimReport | None = None,
    samples_per_message: int | None = None,
    connect_timeout: float = 10.0,
    progress: TextIO | None = None,
) -> AuditResult:
    """Read the database and reconcile (see the module docstring). Three scans run at once,
    each on its own connection: readings per device, ``seq`` gaps, dead letters."""
    started = time.monotonic()
    spm = samples_per_message or (report.samples_per_message if report else 1)
    wanted = set(devices)
    by_device: dict[str, DeviceAudit] = {}

    def device(device_id: str) -> DeviceAudit:
        d = by_device.get(device_id)
        if d is None:
            d = by_device[device_id] = DeviceAudit(device_id)
        return d

    unmatched: Counter[str] = Counter()
    dl_samples: dict[tuple[str, str, datetime], int | None] = {}
    prog = Progress(progress)

    async def samples_scan() -> None:
        where = _Where().window("ts", since, until)
        if wanted:
            where.add("device_id = ANY(?::text[])", sorted(wanted))
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        try:
            for r in await _fetch(conn, _SAMPLES_SQL.format(where=where.sql()), where.args):
                d = device(r["device_id"])
                d.rows, d.samples = r["rows"], r["samples"]
        finally:
            await conn.close()
        prog.done("readings")

    async def seq_scan() -> None:
        where = _Where().add("metric = ?", SEQ_METRIC).window("ts", since, until)
        where.add("value = trunc(value)").add("abs(value) < 9.2e18")
        if wanted:
            where.add("device_id = ANY(?::text[])", sorted(wanted))
        sql = _SEQ_SQL.format(where=where.sql(), first_gaps=FIRST_GAPS)
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        try:
            for r in await _fetch(conn, sql, where.args):
                device(r["device_id"]).seq = SeqStats(
                    first=r["first"],
                    last=r["last"],
                    rows=r["rows"],
                    repeats=r["repeats"],
                    gaps=r["gaps"],
                    missing=r["missing"],
                    first_gaps=list(zip(r["firsts"] or (), r["lasts"] or (), strict=True)),
                )
        finally:
            await conn.close()
        prog.done("seq gaps")

    async def dead_letter_scan() -> None:
        where = _Where().window("received_at", since, until)
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
        try:
            async with conn.transaction(readonly=True):
                cursor = conn.cursor(
                    _DEAD_LETTERS_SQL.format(where=where.sql()), *where.args, prefetch=2000
                )
                async for r in cursor:
                    _count_dead_letter(
                        r, template, since, until, wanted, device, unmatched, dl_samples
                    )
            if dl_samples:
                keys = list(dl_samples)
                absent = await conn.fetch(
                    _ABSENT_SQL,
                    [k[0] for k in keys],
                    [k[1] for k in keys],
                    [k[2] for k in keys],
                    [dl_samples[k] for k in keys],
                )
                for r in absent:
                    d = device(r["device_id"])
                    d.dead_letter_samples += 1
                    if r["seq"] is not None:
                        d.dead_letter_seqs.add(r["seq"])
        finally:
            await conn.close()
        prog.done("dead letters")

    for what in ("readings", "seq gaps", "dead letters"):
        prog.start(what)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(samples_scan, name="ingest[audit readings]")
            tg.start_soon(seq_scan, name="ingest[audit seq]")
            tg.start_soon(dead_letter_scan, name="ingest[audit dead letters]")
            tg.start_soon(prog.ticker, name="ingest[audit progress]")
    except ExceptionGroup as group:
        # The scans fail together for one cause (no server, no table): report the first.
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None

    if report is not None and report.per_device is not None:
        for dev, exp in report.per_device.items():
            if not wanted or dev in wanted:
                device(dev).expected = exp
    result = AuditResult(
        since=since,
        until=until,
        template=template.template,
        devices=[by_device[k] for k in sorted(by_device)],
        unmatched_dead_letters=unmatched,
        samples_per_message=spm,
        report=report,
        devices_filtered=bool(wanted),
    )
    reconcile(result)
    result.seconds = time.monotonic() - started
    return result


async def _fetch(
    conn: asyncpg.Connection[asyncpg.Record], sql: str, args: Sequence[Any]
) -> list[asyncpg.Record]:
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
        return list(await conn.fetch(sql, *args))


def _count_dead_letter(
    r: asyncpg.Record,
    template: TopicTemplate,
    since: datetime | None,
    until: datetime | None,
    wanted: set[str],
    device: Callable[[str], DeviceAudit],
    unmatched: Counter[str],
    dl_samples: dict[tuple[str, str, datetime], int | None],
) -> None:
    topic: str = r["topic"]
    reason: str = r["reason"]
    ids = template.match(topic)
    if ids is None:
        if not wanted:
            unmatched[reason] += 1
        return
    device_id = ids[0]
    if wanted and device_id not in wanted:
        return
    d = device(device_id)
    d.dead_letters += 1
    d.dead_letter_reasons[reason] += 1
    decoded = decode(topic, bytes(r["payload"]), r["received_at"], template)
    if not isinstance(decoded, Decoded):
        return
    d.dead_letters_decodable += 1
    # One key per sample: its seq reading when it has one, else its first reading.
    per_ts: dict[datetime, tuple[str, int | None]] = {}
    for reading in decoded.readings:
        if (since is not None and reading.ts < since) or (
            until is not None and reading.ts >= until
        ):
            continue
        seq: int | None = None
        if reading.metric == SEQ_METRIC and reading.value.is_integer():
            seq = int(reading.value)
        if reading.ts not in per_ts or seq is not None:
            per_ts[reading.ts] = (reading.metric, seq)
    for ts, (metric, seq) in per_ts.items():
        dl_samples[(device_id, metric, ts)] = seq
