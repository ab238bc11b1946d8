"""Schema migrations: plain SQL files applied in order, once, under an advisory lock.

The files live in the repository's ``migrations/`` folder and are shipped inside the wheel as
``ingest/db/migrations`` (see pyproject.toml), so a non-editable install migrates too.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from ingest.db.roles import ensure_roles
from ingest.errors import MigrationError

__all__ = ["Migration", "apply_migrations", "load_migrations", "migrate_dsn"]

log = logging.getLogger("ingest.migrate")

# Any constant works; it only has to be the same for every instance ("iotingst" in hex-ish).
_ADVISORY_LOCK_KEY = 0x10_7_1_6E_57


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    sql: str


def _migrations_dir() -> Path:
    packaged = resources.files("ingest.db") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    # Editable install / source checkout: the top-level folder.
    return Path(__file__).resolve().parents[2] / "migrations"


def load_migrations() -> list[Migration]:
    """Every ``NNNN_name.sql`` file, sorted by name. Reading a few small files at start-up,
    before the event loop serves anything, is acceptable synchronous I/O."""
    folder = _migrations_dir()
    files = sorted(folder.glob("*.sql"))
    if not files:
        raise MigrationError("-", f"no migration files found in {folder}")
    return [Migration(version=f.stem, sql=f.read_text(encoding="utf-8")) for f in files]


_DONE_SQL = """
    SELECT version FROM schema_migrations
"""
# Whether the connected role may act as the owner of the schema's tables (a superuser may).
_OWNER_SQL = """
    SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class
    WHERE oid = to_regclass('schema_migrations')
"""


async def apply_migrations(conn: asyncpg.Connection[asyncpg.Record]) -> list[str]:
    """Apply the pending migrations on ``conn``; returns the versions applied now.

    Each migration runs in its own transaction. A session-level advisory lock serializes
    concurrent instances: the second waits, then finds nothing left to do. The owner of the
    tables (``ingest migrate``) also makes the roles and their grants (:mod:`ingest.db.roles`).
    Any other role (an ``ingest_writer`` login) with nothing pending only reads
    ``schema_migrations``: no lock, no DDL.
    """
    migrations = load_migrations()
    if not await _pending(conn, migrations) and not await conn.fetchval(_OWNER_SQL):
        return []
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    text        PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        for m in await _pending(conn, migrations):
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", m.version
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(m.version, str(exc)) from exc
            log.info("applied migration %s", m.version)
            applied_now.append(m.version)
        await _roles(conn)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    return applied_now


async def _pending(
    conn: asyncpg.Connection[asyncpg.Record], migrations: list[Migration]
) -> list[Migration]:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return migrations
    done = {r["version"] for r in await conn.fetch(_DONE_SQL)}
    return [m for m in migrations if m.version not in done]


async def _roles(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    try:
        outcome = await ensure_roles(conn)
    except asyncpg.PostgresError as exc:
        raise MigrationError("roles", str(exc)) from exc
    if outcome.created:
        log.info("roles created: %s", ", ".join(outcome.created))
    if outcome.missing:
        user = await conn.fetchval("SELECT current_user")
        log.warning(
            "cannot create roles %s: role %s may not create roles (no CREATEROLE); run the SQL"
            " printed on standard output in this database as a role that may (or create the"
            " roles and run `ingest migrate` again)",
            ", ".join(outcome.missing),
            user,
        )
        # For the operator to pipe to psql; a few hundred bytes, once, before anything runs.
        sys.stdout.write(outcome.sql + "\n")
        sys.stdout.flush()
    for warning in outcome.warnings:
        log.warning("roles: %s", warning)


async def migrate_dsn(dsn: str | None) -> list[str]:
    """Connect to ``dsn`` (None: libpq environment defaults), migrate, disconnect."""
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()
