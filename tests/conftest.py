"""Server fixtures for the integration tests.

Where the servers come from, first that works: the INGEST_TEST_DATABASE_URL /
INGEST_TEST_MQTT_URL environment variables; throwaway servers from the local binaries
(tests/servers.py); Docker through testcontainers; the embedded servers of the test extra
(pgserver, iotcore); else the test is skipped with the reason, or fails when
INGEST_REQUIRE_SERVICES=1 (CI), so CI can never go green without them.

- `postgres_server` (session): admin DSN of a server where tests may CREATE DATABASE.
- `database_url`: DSN of a fresh empty database, dropped after the test.
- `mqtt_url` (session): `mqtt://127.0.0.1:<port>` of a broker with the project config.
- `mosquitto_factory(overrides=None)`, `postgres_factory()`: own started, restartable local
  servers for tests that stop, kill or reconfigure them; all closed at test end. Without the
  local binaries they are the embedded ones. The embedded broker (iotcore) cannot stand in for
  mosquitto everywhere: a test that passes mosquitto.conf overrides, restarts the broker
  (iotcore keeps no sessions across a restart) or runs the daemon with MQTT v5 (a
  `protocol` parameter of "5": the embedded listener speaks 3.1.1) is skipped with that reason,
  also under INGEST_REQUIRE_SERVICES=1: it is a limit of that broker, not a missing server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.servers import (
    DockerMosquitto,
    DockerPostgres,
    EmbeddedBroker,
    EmbeddedPostgres,
    Mosquitto,
    MosquittoFactory,
    PostgresCluster,
    PostgresFactory,
    docker_available,
    embedded_broker_available,
    embedded_postgres_available,
    find_mosquitto,
    find_postgres_bindir,
    run_sql,
)

# What the embedded broker (iotcore: rumqttd) cannot stand in for, beyond what its restart() and
# the checks in mosquitto_factory catch. rumqttd sends a client at most 100 unacknowledged
# messages, and while those 100 are in flight with more waiting it sends nothing else: no SUBACK,
# no PINGRESP. The daemon acknowledges only after commit and reads only once subscribed, so a
# daemon that reconnects to a backlog of more than 100 messages never gets its SUBACK, and one
# that holds a full window for two keepalives (a database outage) is cut off and then meets that
# backlog. Those tests need mosquitto until the daemon reads while it waits for the SUBACK.
_IOTCORE_BACKLOG = (
    "the embedded broker (iotcore) sends no SUBACK/PINGRESP while 100 messages are in flight and"
    " the daemon reads only after its SUBACK: a reconnect to a backlog stalls; needs mosquitto"
)
_NOT_ON_IOTCORE: dict[str, str] = {
    "test_sigkill_mid_stream_then_restart_exact_count": _IOTCORE_BACKLOG,
    "test_sigterm_drains_exit_0_and_resume_loses_nothing": _IOTCORE_BACKLOG,
}
_FAULTS_DIR = Path(__file__).resolve().parent / "faults"


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
    elif embedded_postgres_available():  # issue 7: the embedded last resort (pgserver wheel)
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
    elif embedded_broker_available():  # issue 7: the embedded last resort (iotcore wheel)
        with EmbeddedBroker() as broker:
            yield broker.url
    else:
        _unavailable(
            "no MQTT broker for integration tests: INGEST_TEST_MQTT_URL is unset, no local"
            " mosquitto (PATH, /usr/sbin), no Docker daemon and no iotcore"
            " (pip install -e '.[test]')"
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
        if reason := _NOT_ON_IOTCORE.get(getattr(request.node, "originalname", "")):
            pytest.skip(reason)
        if _FAULTS_DIR in Path(request.node.path).resolve().parents:
            pytest.skip(f"fault suite: {_IOTCORE_BACKLOG}")
        params = getattr(request.node, "callspec", None)
        if params is not None and str(params.params.get("protocol")) == "5":
            pytest.skip("the embedded broker (iotcore) listens for MQTT 3.1.1; v5 needs mosquitto")
    with ExitStack() as stack:

        def factory(overrides: dict[str, str] | None = None) -> Mosquitto:
            if not embedded:
                return stack.enter_context(Mosquitto(overrides))
            if overrides:
                pytest.skip(f"mosquitto.conf overrides {overrides} need mosquitto, not iotcore")
            return stack.enter_context(EmbeddedBroker())

        yield factory


@pytest.fixture
def postgres_factory() -> Iterator[PostgresFactory]:
    embedded = find_postgres_bindir() is None
    if embedded and not embedded_postgres_available():
        _unavailable(
            "this test restarts its own PostgreSQL and needs local initdb/pg_ctl (or the"
            " pgserver wheel: pip install -e '.[test]')"
        )
    with ExitStack() as stack:

        def factory() -> PostgresCluster:
            if embedded:
                return stack.enter_context(EmbeddedPostgres())
            return stack.enter_context(PostgresCluster())

        yield factory
