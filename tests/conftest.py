"""Server fixtures for the integration tests.

Where the servers come from, first that works: the INGEST_TEST_DATABASE_URL /
INGEST_TEST_MQTT_URL environment variables; throwaway servers from the local binaries
(tests/servers.py); Docker through testcontainers; else the test is skipped with the reason, or
fails when INGEST_REQUIRE_SERVICES=1 (CI), so CI can never go green without them.

- `postgres_server` (session): admin DSN of a server where tests may CREATE DATABASE.
- `database_url`: DSN of a fresh empty database, dropped after the test.
- `mqtt_url` (session): `mqtt://127.0.0.1:<port>` of a broker with the project config.
- `mosquitto_factory(overrides=None)`, `postgres_factory()`: own started, restartable local
  servers for tests that stop, kill or reconfigure them; all closed at test end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.servers import (
    DockerMosquitto,
    DockerPostgres,
    Mosquitto,
    MosquittoFactory,
    PostgresCluster,
    PostgresFactory,
    docker_available,
    find_mosquitto,
    find_postgres_bindir,
    run_sql,
)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("INGEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (INGEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    if url := os.environ.get("INGEST_TEST_DATABASE_URL"):
        yield url
    elif find_postgres_bindir() is not None:
        with PostgresCluster() as cluster:
            yield cluster.dsn()
    elif docker_available():
        with DockerPostgres() as container:
            yield container.dsn
    # Issue 7: the embedded last resort (pgserver / iotcore wheels) goes here, as one more elif.
    else:
        _unavailable(
            "no PostgreSQL for integration tests: INGEST_TEST_DATABASE_URL is unset, no local"
            " initdb/pg_ctl (PATH, /usr/lib/postgresql/*/bin) and no Docker daemon"
        )


@pytest.fixture
def database_url(postgres_server: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    run_sql(postgres_server, f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(postgres_server)._replace(path=f"/{name}"))
    run_sql(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def mqtt_url() -> Iterator[str]:
    if url := os.environ.get("INGEST_TEST_MQTT_URL"):
        yield url
    elif find_mosquitto() is not None:
        with Mosquitto() as broker:
            yield broker.url
    elif docker_available():
        with DockerMosquitto() as container:
            yield container.url
    # Issue 7: the embedded last resort goes here, as one more elif.
    else:
        _unavailable(
            "no MQTT broker for integration tests: INGEST_TEST_MQTT_URL is unset, no local"
            " mosquitto (PATH, /usr/sbin) and no Docker daemon"
        )


@pytest.fixture
def mosquitto_factory() -> Iterator[MosquittoFactory]:
    if find_mosquitto() is None:
        _unavailable("this test restarts its own broker and needs a local mosquitto binary")
    with ExitStack() as stack:

        def factory(overrides: dict[str, str] | None = None) -> Mosquitto:
            return stack.enter_context(Mosquitto(overrides))

        yield factory


@pytest.fixture
def postgres_factory() -> Iterator[PostgresFactory]:
    if find_postgres_bindir() is None:
        _unavailable("this test restarts its own PostgreSQL and needs local initdb/pg_ctl")
    with ExitStack() as stack:

        def factory() -> PostgresCluster:
            return stack.enter_context(PostgresCluster())

        yield factory
