"""A writer whose login loses a privilege mid-run stops with the SQLSTATE and turns nothing into
dead letters; granted again, a new writer stores the same messages (the broker redelivers what
was never acknowledged) and nothing is lost (docs/design.md, Roles)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ingest.errors import FatalError, describe_root
from ingest.flow.writer import Writer
from tests.integration.flow.test_writer import T0, database, fleet, message, quick_writer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def login_with_writes(
    db: asyncpg.Connection[asyncpg.Record], database_url: str
) -> AsyncIterator[tuple[str, str]]:
    """A login role of its own that may write every table (not the owner, not a superuser):
    (its name, a DSN for it). The test cluster trusts local logins, so no password."""
    role = f"writer_{uuid.uuid4().hex[:12]}"
    await db.execute(
        f"CREATE ROLE {role} LOGIN;"
        f" GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role};"
        f" GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
    )
    parts = urlsplit(database_url)
    netloc = f"{role}@{parts.hostname}:{parts.port}"
    try:
        yield role, urlunsplit(parts._replace(netloc=netloc))
    finally:
        await db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


async def test_a_revoked_writer_stops_with_42501_and_loses_nothing(database_url: str) -> None:
    first = fleet(4)
    # Bisection starts (the last message cannot be encoded), then the revoked privilege is met.
    second = [*fleet(6, start=100), message("dev-bad", ("\ud800", T0, 1.0))]
    async with database(database_url) as db, login_with_writes(db, database_url) as (role, dsn):
        async with quick_writer(dsn) as writer:
            assert (await writer.write(first)).inserted == 4 * 2
            await db.execute(f"REVOKE INSERT ON points FROM {role}")
            with pytest.raises(FatalError, match="42501") as caught:
                await writer.write(second)
            stats = writer.statistics()
        assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert stats.dead_letters == 0 and stats.retries_by_class.get("transient", 0) == 0
        assert describe_root(caught.value) == (
            "permission denied for table points (SQLSTATE 42501)"
        )

        await db.execute(f"GRANT INSERT ON points TO {role}")
        async with quick_writer(dsn) as restarted:  # the daemon restarted; all redelivered
            again = await restarted.write(second)
        count = await db.fetchval("SELECT count(*) FROM readings")
        dead = await db.fetch("SELECT topic, reason FROM dead_letters")

    assert (again.inserted, again.dead_reasons) == (6 * 2, {"rejected_by_database": 1})
    assert count == (4 + 6) * 2
    assert [(r["topic"], r["reason"]) for r in dead] == [
        ("devices/dev-bad/telemetry", "rejected_by_database")
    ]


async def test_a_writer_without_its_database_login_stops_at_start(database_url: str) -> None:
    async with database(database_url) as db, login_with_writes(db, database_url) as (role, dsn):
        await db.execute(f"ALTER ROLE {role} NOLOGIN")
        writer: Writer = quick_writer(dsn)
        with pytest.raises(FatalError, match="28000") as caught:
            async with writer:
                pass
    assert "not permitted to log in" in describe_root(caught.value)
