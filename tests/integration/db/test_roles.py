"""Least privilege against a real PostgreSQL: ``ingest migrate`` makes ``ingest_writer`` and
``ingest_reader``; the daemon runs as a writer login (writes, maintains partitions, folds the
dashboards, prunes) without DDL; a reader login reads every dashboard relation and nothing of
the dead letters' payloads, and writes nothing; a migrating role that may not create roles
says so and prints the SQL that makes it right."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from ingest.db.dashboard import Folder
from ingest.db.migrate import migrate_dsn
from ingest.db.partitions import ensure_partitions
from ingest.db.roles import READER, WRITER
from ingest.devservers.throwaway import PostgresFactory
from ingest.flow.writer import Writer
from ingest.model import DashboardStatistics, Decoded, Envelope, Reading
from ingest.settings import Settings
from tests.integration.support import Daemon, Publisher, query, scalar, unique_topic, wait_until

READER_RELATIONS = [
    "readings", "text_readings", "series", "devices", "latest_readings", "latest_text",
    "readings_1m", "readings_fleet_1m", "device_status", "fleet_status", "current_values", "fleet_summary_1h", "dead_letters_summary",
]  # fmt: skip
TABLES = [
    "readings", "points", "text_points", "dead_letters", "devices", "latest_readings", "readings_1m", "readings_fleet_1m",
    "dashboard_pending", "dashboard_failed", "schema_migrations", "sessions",
]  # fmt: skip


def as_user(dsn: str, user: str, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    netloc = f"{user}@{parts.hostname}:{parts.port}"
    return urlunsplit(
        parts._replace(netloc=netloc, path=f"/{database}" if database else parts.path)
    )


def run(dsn: str, *statements: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def migrate(dsn: str) -> list[str]:
    return asyncio.run(migrate_dsn(dsn))


@pytest.fixture
def login(postgres_server: str) -> Iterator[Any]:
    """``login(role)``: a new LOGIN role granted ``role``, dropped at the end."""
    made: list[str] = []

    def make(granted: str) -> str:
        name = f"{granted.removeprefix('ingest_')}_{uuid.uuid4().hex[:8]}"
        run(postgres_server, f"CREATE ROLE {name} LOGIN IN ROLE {granted}")
        made.append(name)
        return name

    yield make
    for name in made:
        run(postgres_server, f"DROP ROLE IF EXISTS {name}")


def privileges(dsn: str, role: str) -> dict[str, set[str]]:
    rows = query(
        dsn,
        "SELECT t, p FROM unnest($1::text[]) t,"
        " unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',"
        " 'TRIGGER']) p WHERE to_regclass(t) IS NOT NULL AND has_table_privilege($2, t, p)",
        [*TABLES, *READER_RELATIONS],
        role,
    )
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["t"], set()).add(r["p"])
    return out


def test_migrate_makes_both_roles_once_and_grants_in_every_database(
    postgres_server: str, database_url: str
) -> None:
    other = f"test_{uuid.uuid4().hex[:16]}"
    run(postgres_server, f'CREATE DATABASE "{other}"')
    other_url = urlunsplit(urlsplit(database_url)._replace(path=f"/{other}"))
    try:
        migrate(database_url)
        migrate(other_url)
        again = migrate(database_url)  # nothing pending: grants again, no error
        roles = query(
            postgres_server,
            "SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles"
            " WHERE rolname = ANY ($1::text[]) ORDER BY 1",
            [READER, WRITER],
        )
        writer = [privileges(url, WRITER) for url in (database_url, other_url)]
        reader = [privileges(url, READER) for url in (database_url, other_url)]
    finally:
        run(postgres_server, f'DROP DATABASE "{other}" WITH (FORCE)')

    assert again == []
    assert [tuple(r) for r in roles] == [
        (READER, False, False, False, False),
        (WRITER, False, False, False, False),
    ]
    rw = {"SELECT", "INSERT", "UPDATE", "DELETE"}
    assert (
        writer[0]
        == writer[1]
        == {
            **{t: rw for t in TABLES if t != "schema_migrations"},
            "schema_migrations": {"SELECT"},
            "series": {"SELECT", "INSERT", "UPDATE"},
            "sessions": {"SELECT", "INSERT", "UPDATE"},
            "latest_text": rw,
        }
    )
    assert reader[0] == reader[1] == {t: {"SELECT"} for t in READER_RELATIONS}


def test_reader_reads_every_dashboard_relation_and_nothing_else(
    database_url: str, login: Any
) -> None:
    migrate(database_url)
    run(
        database_url,
        "INSERT INTO dead_letters (received_at, topic, payload, error, reason)"
        " VALUES (now(), 't', 'secret bytes', 'e', 'not_json')",
    )
    reader_url = as_user(database_url, login(READER))
    refused = [
        "SELECT payload FROM dead_letters",
        "SELECT count(*) FROM dead_letters",
        "SELECT * FROM dashboard_pending",
        "INSERT INTO readings VALUES ('d', 'm', now(), 1)",
        "UPDATE devices SET last_ts = now()",
        "DELETE FROM latest_readings",
        "DELETE FROM readings_1m",
        "TRUNCATE readings_fleet_1m",
        "INSERT INTO dead_letters (received_at, topic, payload, error) VALUES (now(), 't', '', 'e')",
        "CREATE TABLE mine (x int)",
        "SELECT ingest_create_partition('points', now())",
        "SELECT ingest_drop_expired('points', now())",
        "SELECT * FROM sessions",
    ]

    async def check() -> tuple[dict[str, int], asyncpg.Record | None, list[str]]:
        reader = await asyncpg.connect(reader_url)
        denied: list[str] = []
        try:
            counts = {
                r: await reader.fetchval(f"SELECT count(*) FROM {r}") for r in READER_RELATIONS
            }
            summary = await reader.fetchrow("SELECT * FROM dead_letters_summary")
            for statement in refused:
                try:
                    await reader.execute(statement)
                except asyncpg.InsufficientPrivilegeError:
                    denied.append(statement)
        finally:
            await reader.close()
        return counts, summary, denied

    counts, summary, denied = asyncio.run(check())

    assert counts["dead_letters_summary"] == 1
    assert summary is not None and "payload" not in dict(summary)
    assert summary["payload_size"] == len(b"secret bytes")
    assert denied == refused


def fleet_payloads(template: str, devices: int, count: int) -> list[tuple[str, bytes]]:
    now_ms = int(time.time() * 1000)
    return [
        (
            template.replace("{device_id}", f"dev-{d:03d}"),
            json.dumps({"ts": now_ms - 1000 + seq, "t": seq + d / 10, "rh": 40.5}).encode(),
        )
        for seq in range(count)
        for d in range(devices)
    ]


def test_the_daemon_runs_as_a_writer_login_without_ddl(
    database_url: str, mqtt_url: str, login: Any
) -> None:
    migrate(database_url)
    old = datetime.now(UTC) - timedelta(days=60)

    async def prepare() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            made = await ensure_partitions(conn, days_ahead=1, now=old)
            await conn.execute(
                "INSERT INTO dead_letters (received_at, topic, payload, error, reason)"
                " VALUES ($1, 't', '', 'e', 'not_json'), (now(), 't', '', 'e', 'not_json')",
                old,
            )
            await conn.execute("INSERT INTO devices VALUES ('dev-gone', $1, $1, $1)", old)
            return made
        finally:
            await conn.close()

    old_partitions = asyncio.run(prepare())
    writer = login(WRITER)
    topic = unique_topic()
    daemon = Daemon(
        database_url=as_user(database_url, writer),
        mqtt_url=mqtt_url,
        topic=topic,
        extra_env={
            "INGEST_RETENTION": "30d",
            "INGEST_DEAD_LETTER_RETENTION": "30d",
            "INGEST_DASHBOARD_INTERVAL": "0.2",
        },
    )
    messages = fleet_payloads(topic, 5, 20)
    with daemon:
        daemon.wait_subscribed()
        with Publisher(mqtt_url) as publisher:
            publisher.publish_many(messages)
        wait_until(
            lambda: scalar(database_url, "SELECT coalesce(sum(n), 0) FROM readings_1m") == 200,
            what="200 readings folded into readings_1m",
        )
        code = daemon.stop()
    log = daemon.log_text()
    parts = [
        r["relname"]
        for r in query(
            database_url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'points'::regclass ORDER BY 1",
        )
    ]
    today = datetime.now(UTC).date()
    owners = {
        r[0]
        for r in query(
            database_url,
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace",
        )
    }

    assert code == 0, log[-3000:]
    assert "permission denied" not in log
    assert scalar(database_url, "SELECT count(*) FROM readings") == 200
    assert scalar(database_url, "SELECT count(*) FROM latest_readings") == 10
    assert scalar(database_url, "SELECT count(*) FROM dashboard_pending") == 0
    assert old_partitions and not set(old_partitions) & set(parts)  # dropped by retention
    assert f"points_p{today:%Y%m%d}" in parts  # created ahead, through the functions
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 1
    assert scalar(database_url, "SELECT count(*) FROM devices WHERE device_id = 'dev-gone'") == 0
    assert writer not in owners  # the writer created nothing


def ingest_migrate(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INGEST_DATABASE_URL": dsn, "INGEST_LOG_FORMAT": "text"}
    return subprocess.run(
        [sys.executable, "-m", "ingest", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_migrating_role_that_cannot_create_roles_prints_the_sql(
    postgres_factory: PostgresFactory,
) -> None:
    cluster = postgres_factory()  # no ingest roles in it yet
    admin = cluster.dsn()
    run(
        admin,
        "CREATE ROLE migrator LOGIN NOSUPERUSER NOCREATEROLE",
        "CREATE DATABASE app OWNER migrator",
    )
    app_admin = cluster.dsn("app")
    migrator = as_user(app_admin, "migrator")

    first = ingest_migrate(migrator)
    roles_before = scalar(admin, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'ingest\\_%'")
    warnings = [line for line in first.stderr.splitlines() if "cannot create roles" in line]
    sql = first.stdout
    run(app_admin, sql)
    second = ingest_migrate(migrator)

    assert first.returncode == 0, first.stderr
    assert roles_before == 0
    assert len(warnings) == 1, first.stderr  # said in one line
    assert "ingest_writer, ingest_reader" in warnings[0] and "migrator" in warnings[0]
    assert sql.startswith("CREATE ROLE ingest_writer NOLOGIN;\nCREATE ROLE ingest_reader NOLOGIN;")
    assert second.returncode == 0 and "cannot create roles" not in second.stderr, second.stderr
    assert privileges(app_admin, READER) == {t: {"SELECT"} for t in READER_RELATIONS}
    assert privileges(app_admin, WRITER)["readings"] == {"SELECT", "INSERT", "UPDATE", "DELETE"}


def test_a_writer_that_loses_a_privilege_names_it_and_sets_nothing_aside(
    database_url: str, login: Any, caplog: pytest.LogCaptureFixture
) -> None:
    migrate(database_url)
    writer_url = as_user(database_url, login(WRITER))
    now = datetime.now(UTC)
    log = logging.getLogger("test.roles.folder")

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(2400):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("condition never met")

    async def go() -> tuple[DashboardStatistics, DashboardStatistics, int]:
        async with Writer(dsn=writer_url, connect_timeout=5.0, write_timeout=20.0) as writer:
            for d in range(3):
                rows = [Reading(f"dev-{d}", "t", now, float(d))]
                await writer.write([Envelope("t", b"{}", now, Decoded(rows, 0))])
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f"REVOKE UPDATE ON devices FROM {WRITER}")
            settings = Settings(database_url=writer_url, dashboard_interval=0.05)
            folder = Folder(writer_url, settings, log, retry_interval=0.1)
            async with anyio.create_task_group() as tg:
                tg.start_soon(folder.run)
                await until(lambda: folder.statistics().fold_failures >= 2)
                failing = folder.statistics()
                pending = await admin.fetchval("SELECT count(*) FROM dashboard_pending")
                await admin.execute(f"GRANT UPDATE ON devices TO {WRITER}")
                await until(lambda: folder.statistics().failing_since is None)
                tg.cancel_scope.cancel()
            return failing, folder.statistics(), pending
        finally:
            await admin.close()

    with caplog.at_level(logging.WARNING, logger="test.roles.folder"):
        failing, recovered, pending = asyncio.run(go())
    devices = scalar(database_url, "SELECT count(*) FROM devices")

    assert failing.last_error is not None and "42501" in failing.last_error
    assert "permission denied for table devices" in failing.last_error
    assert failing.set_aside == 0 and pending == 3  # a privilege is not bad data
    assert "42501" in caplog.text
    assert recovered.set_aside == 0 and recovered.failing_since is None
    assert devices == 3
