"""Server fixtures for the integration tests.

Where the servers come from, first that works: the INGEST_TEST_DATABASE_URL /
INGEST_TEST_MQTT_URL environment variables; throwaway servers from the local binaries
(ingest/devservers); Docker through testcontainers; the embedded servers of the test extra
(pgserver, iotcore); else the test is skipped with the reason, or fails when
INGEST_REQUIRE_SERVICES=1 (CI), so CI can never go green without them.

- `postgres_server` (session): admin DSN of a server where tests may CREATE DATABASE.
- `database_url`: DSN of a fresh empty database, dropped after the test.
- `mqtt_url` (session): `mqtt://127.0.0.1:<port>` of a broker with the project config.
- `mosquitto_factory(overrides=None, *, listeners=(), password_file=None, acl_file=None,
  allow_anonymous=None)`, `postgres_factory(*, settings=None, hba=())`: own started,
  restartable local servers for tests that stop, kill or reconfigure them (arguments: see
  ingest.devservers.throwaway.Mosquitto and PostgresCluster);
  all closed at test end. Without the local binaries they are the embedded ones. The embedded
  broker (iotcore) cannot stand in for mosquitto everywhere: a test that passes mosquitto
  settings (overrides, listeners, passwords, ACLs), restarts the broker
  (iotcore keeps no sessions across a restart) or runs the daemon with MQTT v5 (a
  `protocol` parameter of "5": the embedded listener speaks 3.1.1) is skipped with that reason,
  also under INGEST_REQUIRE_SERVICES=1: it is a limit of that broker, not a missing server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from typing import Any, NoReturn, Self
from urllib.parse import urlsplit, urlunsplit

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.docker import DockerMosquitto, DockerPostgres, docker_available
from ingest.devservers.postgres import pgserver_bindir, ssl_supported
from ingest.devservers.throwaway import (
    EmbeddedBroker,
    EmbeddedPostgres,
    Mosquitto,
    MosquittoFactory,
    PostgresCluster,
    PostgresFactory,
    embedded_broker_available,
    embedded_postgres_available,
    find_mosquitto,
    local_postgres_bindir,
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
    elif local_postgres_bindir() is not None:
        with PostgresCluster() as cluster:
            yield cluster.dsn()
    elif docker_available():
        with DockerPostgres() as container:
            yield container.dsn
    elif embedded_postgres_available():  # the last resort: the pgserver wheel
        with EmbeddedPostgres() as server:
            yield server.dsn()
    else:
        _unavailable(
            "no PostgreSQL for integration tests: INGEST_TEST_DATABASE_URL is unset, no local"
            " initdb/pg_ctl (PATH, /usr/lib/postgresql/*/bin), no Docker daemon and no pgserver"
            " (pip install -e '.[test]')"
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
    elif embedded_broker_available():  # the last resort: the iotcore wheel
        with EmbeddedBroker() as broker:
            yield broker.url
    else:
        _unavailable(
            "no MQTT broker for integration tests: INGEST_TEST_MQTT_URL is unset, no local"
            " mosquitto (PATH, /usr/sbin), no Docker daemon and no iotcore"
            " (pip install -e '.[test]')"
        )


class _EmbeddedBrokerForTests(EmbeddedBroker):
    def restart(self) -> Self:
        # What a test restarts a broker for is its sessions and queues, which iotcore loses.
        pytest.skip(
            "the embedded broker (iotcore) keeps no sessions or queued messages across a"
            " restart; this test needs mosquitto"
        )


@pytest.fixture
def mosquitto_factory(request: pytest.FixtureRequest) -> Iterator[MosquittoFactory]:
    embedded = find_mosquitto() is None
    if embedded:
        if not embedded_broker_available():
            _unavailable(
                "this test restarts its own broker and needs a local mosquitto binary (or the"
                " iotcore wheel: pip install -e '.[test]')"
            )
        params = getattr(request.node, "callspec", None)
        if params is not None and str(params.params.get("protocol")) == "5":
            pytest.skip("the embedded broker (iotcore) listens for MQTT 3.1.1; v5 needs mosquitto")
    with ExitStack() as stack:

        def factory(overrides: Mapping[str, str] | None = None, **config: Any) -> Broker:
            if not embedded:
                return stack.enter_context(Mosquitto(overrides, **config))
            asked = [*(overrides or {}), *(k for k, v in config.items() if v not in (None, ()))]
            if asked:
                pytest.skip(f"mosquitto settings ({', '.join(asked)}) need mosquitto, not iotcore")
            return stack.enter_context(_EmbeddedBrokerForTests())

        yield factory


@pytest.fixture
def postgres_factory() -> Iterator[PostgresFactory]:
    embedded = local_postgres_bindir() is None
    if embedded and not embedded_postgres_available():
        _unavailable(
            "this test restarts its own PostgreSQL and needs local initdb/pg_ctl (or the"
            " pgserver wheel: pip install -e '.[test]')"
        )
    with ExitStack() as stack:

        def factory(
            *, settings: Mapping[str, str] | None = None, hba: Sequence[str] = ()
        ) -> PostgresCluster:
            bindir = pgserver_bindir() if embedded else local_postgres_bindir()
            if (settings or {}).get("ssl") == "on" and not (bindir and ssl_supported(bindir)):
                pytest.skip(f"the PostgreSQL in {bindir} was built without SSL")
            if embedded:
                return stack.enter_context(EmbeddedPostgres(settings=settings, hba=hba))
            return stack.enter_context(PostgresCluster(settings=settings, hba=hba))

        yield factory
