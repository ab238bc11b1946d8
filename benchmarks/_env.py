"""The servers a benchmark runs against: a throwaway Mosquitto, and a throwaway PostgreSQL
cluster or an existing server; a fresh database for every measured run.

Uses the throwaway servers of ``ingest.devservers``. The throwaway cluster starts from the
tests' template (fsync off, 32 MB shared buffers) and is then set to server defaults for a
benchmark: durable (``fsync``, ``full_page_writes`` on) unless
``durable=False``, ``shared_buffers`` 128 MB, and ``track_commit_timestamp`` on, which gives
the exact commit time of every row (``pg_xact_commit_timestamp(xmin)``) without a trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from benchmarks._procstat import postmaster_pid
from ingest.devservers.throwaway import Mosquitto, PostgresCluster

__all__ = ["Environment", "fetch", "fetchval", "open_environment"]


async def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_fetch(dsn, sql, *args))


def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    rows = fetch(dsn, sql, *args)
    return rows[0][0] if rows else None


def _with_db(dsn: str, db: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def _pid_by_cmdline(marker: str) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            if marker.encode() in cmdline:
                return int(entry)
    return None


@dataclass
class Environment:
    mqtt_url: str
    broker_pid: int | None
    admin_dsn: str
    postgres_pid: int | None
    commit_timestamps: bool
    external_db: bool
    databases: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, int | None]:
        return {"broker": self.broker_pid, "postgres": self.postgres_pid}

    def fresh_database(self, label: str) -> str:
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        fetch(self.admin_dsn, f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return _with_db(self.admin_dsn, name)

    def drop_databases(self) -> None:
        for name in self.databases:
            with contextlib.suppress(Exception):
                fetch(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.databases.clear()


_BENCH_SETTINGS = {"shared_buffers": "128MB", "track_commit_timestamp": "on"}


@contextlib.contextmanager
def open_environment(
    *, inflight: int, database_url: str | None, durable: bool = True
) -> Iterator[Environment]:
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(overrides={"max_inflight_messages": str(inflight)}))
        broker_pid = _pid_by_cmdline(str(broker.dir / "mosquitto.conf"))
        if database_url is None:
            cluster = stack.enter_context(PostgresCluster())
            settings = dict(_BENCH_SETTINGS)
            if durable:
                settings |= {"fsync": "on", "full_page_writes": "on"}
            for key, value in settings.items():
                fetch(cluster.dsn(), f"ALTER SYSTEM SET {key} = '{value}'")
            cluster.restart()
            admin = cluster.dsn()
            pg_pid = postmaster_pid(cluster.data)
        else:
            admin = database_url
            datadir = fetchval(
                admin, "SELECT setting FROM pg_settings WHERE name = 'data_directory'"
            )
            pg_pid = postmaster_pid(datadir) if datadir else None
        env = Environment(
            mqtt_url=broker.url,
            broker_pid=broker_pid,
            admin_dsn=admin,
            postgres_pid=pg_pid,
            commit_timestamps=fetchval(admin, "SHOW track_commit_timestamp") == "on",
            external_db=database_url is not None,
        )
        try:
            yield env
        finally:
            if env.external_db:
                env.drop_databases()
