"""The audit itself: three scans of the database at once, then the reconciliation.

Each scan runs on its own connection: readings per device, ``seq`` gaps, dead letters (those
that decode now are decoded, and their samples that are not stored are looked up).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Final, TextIO, TypeAlias

import anyio
import asyncpg

from ingest.formats.decode import RouteTable, decode
from ingest.formats.limits import DEFAULT_LIMITS, Limits
from ingest.model import Decoded, Reading
from ingest.tools.audit.output import Progress
from ingest.tools.audit.queries import (
    ABSENT_SQL,
    DEAD_LETTERS_SQL,
    SAMPLES_SQL,
    SEQ_SQL,
    Where,
    fetch,
)
from ingest.tools.audit.reconcile import reconcile
from ingest.tools.audit.results import AuditResult, DeviceAudit, SeqStats
from ingest.tools.audit.simulator_report import DeviceExpectation, SimReport

__all__ = ["FIRST_GAPS", "SEQ_METRIC", "audit"]

#: Gap ranges listed per device (all of them are counted).
FIRST_GAPS: Final = 5
SEQ_METRIC: Final = "seq"
#: Dead letters read from the server at a time.
DEAD_LETTER_PREFETCH: Final = 2000

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
#: A dead letter's sample: (device_id, metric, ts) -> its seq value when it has one.
SampleKey = tuple[str, str, datetime]


async def audit(
    dsn: str | None,
    *,
    routes: RouteTable,
    since: datetime | None = None,
    until: datetime | None = None,
    devices: Sequence[str] = (),
    report: SimReport | None = None,
    samples_per_message: int | None = None,
    connect_timeout: float = 10.0,
    progress: TextIO | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> AuditResult:
    """Read the database and reconcile (see the package docstring). Three scans run at once,
    each on its own connection: readings per device, ``seq`` gaps, dead letters."""
    started = time.monotonic()
    scan = _Scan(dsn, routes, since, until, set(devices), connect_timeout, limits)
    await scan.run(Progress(progress))
    if report is not None and report.per_device is not None:
        scan.expect(report.per_device)
    result = AuditResult(
        since=since,
        until=until,
        template=routes.filters,
        devices=scan.devices(),
        unmatched_dead_letters=scan.unmatched,
        samples_per_message=samples_per_message or (report.samples_per_message if report else 1),
        report=report,
        devices_filtered=bool(devices),
    )
    reconcile(result)
    result.seconds = time.monotonic() - started
    return result


class _Scan:
    """What the scans found, by device (``wanted``: only these devices, when not empty)."""

    def __init__(
        self,
        dsn: str | None,
        routes: RouteTable,
        since: datetime | None,
        until: datetime | None,
        wanted: set[str],
        connect_timeout: float,
        limits: Limits,
    ) -> None:
        self._dsn = dsn
        self._routes = routes
        self._limits = limits
        self._since = since
        self._until = until
        self._wanted = wanted
        self._connect_timeout = connect_timeout
        self._by_device: dict[str, DeviceAudit] = {}
        self.unmatched: Counter[str] = Counter()
        self._dead_letter_samples: dict[SampleKey, int | None] = {}

    def device(self, device_id: str) -> DeviceAudit:
        d = self._by_device.get(device_id)
        if d is None:
            d = self._by_device[device_id] = DeviceAudit(device_id)
        return d

    def devices(self) -> list[DeviceAudit]:
        return [self._by_device[k] for k in sorted(self._by_device)]

    def expect(self, per_device: Mapping[str, DeviceExpectation]) -> None:
        for device_id, expected in per_device.items():
            if not self._wanted or device_id in self._wanted:
                self.device(device_id).expected = expected

    async def run(self, progress: Progress) -> None:
        scans: dict[str, tuple[str, Callable[[Connection], Awaitable[None]]]] = {
            "readings": ("readings", self._samples),
            "seq gaps": ("seq", self._seq),
            "dead letters": ("dead letters", self._dead_letters),
        }
        for what in scans:
            progress.start(what)
        try:
            async with anyio.create_task_group() as tg:
                for what, (task, scan) in scans.items():
                    tg.start_soon(
                        self._connected, what, scan, progress, name=f"ingest[audit {task}]"
                    )
                tg.start_soon(progress.ticker, name="ingest[audit progress]")
        except ExceptionGroup as group:
            # The scans fail together for one cause (no server, no table): report the first.
            raise _first_cause(group) from None

    async def _connected(
        self, what: str, scan: Callable[[Connection], Awaitable[None]], progress: Progress
    ) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
        try:
            await scan(conn)
        finally:
            await conn.close()
        progress.done(what)

    def _readings_where(self, where: Where) -> Where:
        where.window("ts", self._since, self._until)
        if self._wanted:
            where.add("device_id = ANY(?::text[])", sorted(self._wanted))
        return where

    # -- the three scans ------------------------------------------------------------------

    async def _samples(self, conn: Connection) -> None:
        where = self._readings_where(Where())
        for r in await fetch(conn, SAMPLES_SQL.format(where=where.sql()), where.args):
            d = self.device(r["device_id"])
            d.rows, d.samples = r["rows"], r["samples"]

    async def _seq(self, conn: Connection) -> None:
        where = self._readings_where(Where().add("metric = ?", SEQ_METRIC))
        where.add("value = trunc(value)").add("abs(value) < 9.2e18")
        sql = SEQ_SQL.format(where=where.sql(), first_gaps=FIRST_GAPS)
        for r in await fetch(conn, sql, where.args):
            self.device(r["device_id"]).seq = SeqStats(
                first=r["first"],
                last=r["last"],
                rows=r["rows"],
                repeats=r["repeats"],
                gaps=r["gaps"],
                missing=r["missing"],
                first_gaps=list(zip(r["firsts"] or (), r["lasts"] or (), strict=True)),
            )

    async def _dead_letters(self, conn: Connection) -> None:
        where = Where().window("received_at", self._since, self._until)
        async with conn.transaction(readonly=True):
            sql = DEAD_LETTERS_SQL.format(where=where.sql())
            async for r in conn.cursor(sql, *where.args, prefetch=DEAD_LETTER_PREFETCH):
                self._count_dead_letter(
                    r["topic"], bytes(r["payload"]), r["received_at"], r["reason"]
                )
        if self._dead_letter_samples:
            await self._absent_samples(conn)

    # -- dead letters ---------------------------------------------------------------------

    def _count_dead_letter(
        self, topic: str, payload: bytes, received_at: datetime, reason: str
    ) -> None:
        found = self._routes.route(topic)
        decoded = decode(topic, payload, received_at, self._routes, limits=self._limits)
        device_id = None if found is None else found[1].device_id
        if device_id is None and isinstance(decoded, Decoded) and decoded.readings:
            device_id = decoded.readings[0].device_id  # a format naming its devices
        if device_id is None:
            if not self._wanted:
                self.unmatched[reason] += 1
            return
        if self._wanted and device_id not in self._wanted:
            return
        d = self.device(device_id)
        d.dead_letters += 1
        d.dead_letter_reasons[reason] += 1
        if isinstance(decoded, Decoded):
            d.dead_letters_decodable += 1
            self._note_samples(device_id, decoded.readings)

    def _note_samples(self, device_id: str, readings: Sequence[Reading]) -> None:
        """One key per sample of a decodable dead letter in the window: its seq reading when it
        has one, else its first reading."""
        per_ts: dict[datetime, tuple[str, int | None]] = {}
        for reading in readings:
            if not self._in_window(reading.ts):
                continue
            seq: int | None = None
            if reading.metric == SEQ_METRIC and reading.value.is_integer():
                seq = int(reading.value)
            if reading.ts not in per_ts or seq is not None:
                per_ts[reading.ts] = (reading.metric, seq)
        for ts, (metric, seq) in per_ts.items():
            self._dead_letter_samples[(device_id, metric, ts)] = seq

    def _in_window(self, ts: datetime) -> bool:
        return (self._since is None or ts >= self._since) and (
            self._until is None or ts < self._until
        )

    async def _absent_samples(self, conn: Connection) -> None:
        """Count the dead letters' samples that are not stored as readings."""
        samples = self._dead_letter_samples
        keys = list(samples)
        absent = await conn.fetch(
            ABSENT_SQL,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [samples[k] for k in keys],
        )
        for r in absent:
            d = self.device(r["device_id"])
            d.dead_letter_samples += 1
            if r["seq"] is not None:
                d.dead_letter_seqs.add(r["seq"])


def _first_cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
