"""The SQL of the audit's scans, and how it is run (read-only, with room to sort)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg

__all__ = [
    "ABSENT_SQL",
    "DEAD_LETTERS_SQL",
    "SAMPLES_SQL",
    "SEQ_SQL",
    "WORK_MEM",
    "Where",
    "fetch",
]


class Where:
    """A WHERE clause built from the options given, with numbered parameters."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.args: list[Any] = []

    def add(self, sql: str, *args: Any) -> Where:
        for arg in args:
            self.args.append(arg)
            sql = sql.replace("?", f"${len(self.args)}", 1)
        self.parts.append(sql)
        return self

    def window(self, column: str, since: datetime | None, until: datetime | None) -> Where:
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
SAMPLES_SQL = """
    SELECT device_id, sum(n)::bigint AS rows, count(*) AS samples
    FROM (SELECT device_id, ts, count(*) AS n FROM readings {where} GROUP BY device_id, ts) s
    GROUP BY device_id
"""

# One sort of the seq rows (the window function) and one aggregate over its output: gaps are
# where a value is more than one above the previous. Values that are not integers (or do not
# fit a bigint) are not sequence numbers and are left out.
SEQ_SQL = """
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

DEAD_LETTERS_SQL = "SELECT topic, payload, received_at, reason FROM dead_letters {where}"

# Which samples of decodable dead letters are not in readings: one primary-key probe each.
ABSENT_SQL = """
    SELECT u.device_id, u.ts, u.seq
    FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) AS u(device_id, metric, ts, seq)
    WHERE NOT EXISTS (
        SELECT 1 FROM readings r
        WHERE r.device_id = u.device_id AND r.metric = u.metric AND r.ts = u.ts
    )
"""


async def fetch(
    conn: asyncpg.Connection[asyncpg.Record], sql: str, args: Sequence[Any]
) -> list[asyncpg.Record]:
    """Run one scan in a read-only transaction, with WORK_MEM for its sorts."""
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
        return list(await conn.fetch(sql, *args))
