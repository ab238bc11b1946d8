"""The two roles operators grant to logins (docs/design.md, "Roles"), made and granted by
``ingest migrate``.

- ``ingest_writer``: what ``ingest run`` needs once the schema is migrated. It reads, inserts,
  updates and deletes rows of the data and dashboard tables, reads, inserts and updates (units)
  ``series`` (never deletes: points refer to it) and ``sessions`` (the MQTT sessions the
  daemons opened, migrations/0007_sessions.sql), uses their sequences, reads
  ``schema_migrations`` (the daemon checks that nothing is pending) and executes the two
  partition functions of migrations/0005_roles.sql, which do the only DDL the daemon needs as
  their owner. It may create temporary tables (the writer stages each batch in one) and
  nothing else: it owns nothing and may create nothing in the schema.
- ``ingest_reader``: dashboards. ``SELECT`` on the readings, the devices, the latest and rollup
  tables and the panel views, and ``dead_letters_summary`` (dead letters without their
  payloads); nothing else, no write.

Roles belong to the cluster, privileges to each database: the roles are created once, when
absent (NOLOGIN), and every migrated database gets its grants. Each grant run first revokes
what the roles hold on these relations, so they end up with exactly the privileges above.
When the migrating role may not create roles, :func:`ensure_roles` says so and gives the SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import asyncpg

__all__ = ["READER", "WRITER", "RolesOutcome", "ensure_roles", "grant_statements"]

WRITER: Final = "ingest_writer"
READER: Final = "ingest_reader"

# Relations that do not exist (yet, or any more) are skipped: a grant run fits the schema it
# finds, whatever migrations it holds.
_WRITER_TABLES: Final = (
    "readings",
    "points",
    "text_points",
    "dead_letters",
    "devices",
    "latest_readings",
    "latest_text",
    "readings_1m",
    "readings_fleet_1m",
    "dashboard_pending",
    "dashboard_failed",
    "sparkplug_births",
    "dashboard_staged",
)
_WRITER_READS: Final = ("schema_migrations",)
# Series are created and given units, never deleted by the daemon; sessions are recorded,
# refreshed and marked retired, never deleted (the history of which client ids were used).
_WRITER_GROWS: Final = ("series", "sessions")
_WRITER_SEQUENCES: Final = ("dashboard_batch_seq",)  # and those of the tables' serial columns
_WRITER_FUNCTIONS: Final = (
    "ingest_create_partition(regclass, timestamptz)",
    "ingest_drop_expired(regclass, timestamptz)",
)
_READER_RELATIONS: Final = (
    "readings",
    "text_readings",
    "series",
    "devices",
    "latest_readings",
    "latest_text",
    "readings_1m",
    "readings_fleet_1m",
    "device_status",
    "fleet_status",
    "current_values",
    "fleet_summary_1h",
    "dead_letters_summary",
)
_ALL_RELATIONS: Final = tuple(
    dict.fromkeys(
        (*_WRITER_TABLES, *_WRITER_READS, *_WRITER_GROWS, *_READER_RELATIONS, "dead_letters")
    )
)

_EXISTING_SQL = """
    SELECT n, to_regclass(n)::text AS rel FROM unnest($1::text[]) WITH ORDINALITY AS u (n, i)
    WHERE to_regclass(n) IS NOT NULL ORDER BY i
"""
_SEQUENCES_SQL = """
    SELECT DISTINCT s.oid::regclass::text AS rel FROM pg_depend d
    JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
    WHERE d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
      AND d.refobjid = ANY (SELECT to_regclass(n) FROM unnest($1::text[]) n)
    UNION
    SELECT to_regclass(n)::text FROM unnest($2::text[]) n WHERE to_regclass(n) IS NOT NULL
    ORDER BY 1
"""
_FUNCTIONS_SQL = """
    SELECT to_regprocedure(n)::text FROM unnest($1::text[]) n
    WHERE to_regprocedure(n) IS NOT NULL
"""
_PLACE_SQL = """
    SELECT quote_ident(current_schema()) AS schema, quote_ident(current_database()) AS db,
           pg_has_role(current_user, d.datdba, 'USAGE') AS owns_db,
           pg_has_role(current_user, n.nspowner, 'USAGE') AS owns_schema
    FROM pg_database d, pg_namespace n
    WHERE d.datname = current_database() AND n.nspname = current_schema()
"""


@dataclass(frozen=True, slots=True)
class RolesOutcome:
    """What :func:`ensure_roles` did: the roles it created, whether it granted, and when a
    role is missing and could not be created, the SQL that an operator runs instead."""

    created: tuple[str, ...] = ()
    granted: bool = False
    missing: tuple[str, ...] = ()
    sql: str = ""
    warnings: tuple[str, ...] = field(default=())


async def ensure_roles(conn: asyncpg.Connection[asyncpg.Record]) -> RolesOutcome:
    """Create the roles that do not exist yet, and grant both their privileges in this
    database, in one transaction. Run by the tables' owner (``ingest migrate``) under the
    migration lock: two grant runs on one database at once would collide."""
    created: list[str] = []
    missing: list[str] = []
    for role in await _absent(conn):
        try:
            await conn.execute(f"CREATE ROLE {role} NOLOGIN")
            created.append(role)
        except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            pass  # another database's migration made it a moment ago
        except asyncpg.InsufficientPrivilegeError:
            missing.append(role)
    statements = await grant_statements(conn)
    if missing:
        sql = "\n".join([*(f"CREATE ROLE {r} NOLOGIN;" for r in missing), *statements])
        return RolesOutcome(tuple(created), False, tuple(missing), sql)
    async with conn.transaction():
        for statement in statements:
            await conn.execute(statement)
    return RolesOutcome(tuple(created), True, warnings=tuple(await _warnings(conn)))


async def grant_statements(conn: asyncpg.Connection[asyncpg.Record]) -> list[str]:
    """The statements (each ending with ``;``) that give both roles exactly their privileges
    on the relations of this database's schema."""
    place = await conn.fetchrow(_PLACE_SQL)
    assert place is not None  # the current database is in pg_database
    rels = {r["n"]: r["rel"] for r in await conn.fetch(_EXISTING_SQL, list(_ALL_RELATIONS))}
    sequences = [
        r["rel"]
        for r in await conn.fetch(
            _SEQUENCES_SQL, [*_WRITER_TABLES, *_WRITER_GROWS], list(_WRITER_SEQUENCES)
        )
    ]
    functions = [r[0] for r in await conn.fetch(_FUNCTIONS_SQL, list(_WRITER_FUNCTIONS))]

    def on(kind: str, objects: list[str]) -> str:
        return f"ON {kind} {', '.join(objects)}" if objects else ""

    def tables(names: tuple[str, ...]) -> str:
        return on("TABLE", [rels[n] for n in names if n in rels])

    both = f"{WRITER}, {READER}"
    statements = [
        (f"REVOKE ALL {tables(_ALL_RELATIONS)} FROM {both}", tables(_ALL_RELATIONS)),
        (f"REVOKE ALL {on('SEQUENCE', sequences)} FROM {both}", sequences),
        (f"GRANT USAGE {on('SEQUENCE', sequences)} TO {WRITER}", sequences),
        (f"GRANT SELECT, INSERT, UPDATE, DELETE {tables(_WRITER_TABLES)} TO {WRITER}", True),
        (f"GRANT SELECT {tables(_WRITER_READS)} TO {WRITER}", tables(_WRITER_READS)),
        (
            f"GRANT SELECT, INSERT, UPDATE {tables(_WRITER_GROWS)} TO {WRITER}",
            tables(_WRITER_GROWS),
        ),
        (f"GRANT EXECUTE {on('FUNCTION', functions)} TO {WRITER}", functions),
        (f"GRANT SELECT {tables(_READER_RELATIONS)} TO {READER}", True),
        # Only the schema's owner may; USAGE on public is granted to PUBLIC anyway.
        (f"GRANT USAGE ON SCHEMA {place['schema']} TO {both}", place["owns_schema"]),
        # Usually granted to PUBLIC already; explicit, in case a DBA revoked that.
        (f"GRANT CONNECT, TEMPORARY ON DATABASE {place['db']} TO {WRITER}", place["owns_db"]),
        (f"GRANT CONNECT ON DATABASE {place['db']} TO {READER}", place["owns_db"]),
    ]
    return [f"{statement};" for statement, wanted in statements if wanted]


async def _absent(conn: asyncpg.Connection[asyncpg.Record]) -> list[str]:
    present = {
        r[0]
        for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY ($1::text[])", [WRITER, READER]
        )
    }
    return [r for r in (WRITER, READER) if r not in present]


async def _warnings(conn: asyncpg.Connection[asyncpg.Record]) -> list[str]:
    """Privileges the roles hold through PUBLIC, which a grant run does not take away."""
    schema = await conn.fetchval("SELECT current_schema()")
    return [
        f"{role} may create objects in schema {schema} (granted to PUBLIC, the default before"
        f" PostgreSQL 15): REVOKE CREATE ON SCHEMA {schema} FROM PUBLIC to take it away"
        for role in (WRITER, READER)
        if await conn.fetchval("SELECT has_schema_privilege($1, current_schema(), 'CREATE')", role)
    ]
