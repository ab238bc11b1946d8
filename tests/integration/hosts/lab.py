"""The hosts room's lab: a broker host and a database host on a network of namespaces.

Two nets, as a deployment would have them: ``front`` (10.231.1.0/24: the broker, the
publisher, the ingest hosts) and ``back`` (10.231.2.0/24: the database, the ingest hosts), so a
test can cut an ingest host from the broker, from the database, or from both. The broker host
runs a throwaway mosquitto (the project config, a window of ``INFLIGHT``) listening on its
front address; the database host a throwaway PostgreSQL listening on its back address, whose
pg_hba.conf lets the login ``ingest`` in from the back subnet with a password. The hosts
``ing1``, ``ing2`` (both nets) and ``pub`` (front) are there for what the tests run on them.

``why_not`` says why a lab cannot be made here (not root, no ``ip``, no CAP_NET_ADMIN, no
mosquitto binary: the embedded broker listens on 127.0.0.1 only); ``servers`` starts the two
servers in their hosts (conftest.py's ``lab`` fixture builds the rest and takes it apart).
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import asyncpg

from ingest.devservers.postgres import local_postgres_bindir, pgserver_bindir
from ingest.devservers.throwaway import Listener, Mosquitto, PostgresCluster, find_mosquitto
from tests.integration.hosts.netns import Network, unavailable

NETS = {"front": "10.231.1", "back": "10.231.2"}
BROKER_PORT = 1883
# The broker's in-flight window (max_inflight_messages) and the daemons' INGEST_MQTT_INFLIGHT:
# small, so that a host whose writes stall fills it within a second or two of the stream.
INFLIGHT = 100


@dataclass(frozen=True)
class Database:
    """One test's database: ``url`` as the ingest hosts reach it (the back net, a password),
    ``local`` as the database host itself does (loopback, the superuser)."""

    name: str
    url: str
    local: str


@dataclass(frozen=True)
class Lab:
    net: Network
    broker_url: str
    db_port: int
    password: str

    def sql(self, dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Run ``sql`` from the database host."""
        return self.net.call("db", _fetch, dsn, sql, *args)

    def database(self) -> Database:
        name = f"hosts_{uuid.uuid4().hex[:12]}"
        admin = f"postgresql://postgres@127.0.0.1:{self.db_port}/postgres"
        self.sql(admin, f'CREATE DATABASE "{name}" OWNER ingest')
        addr = self.net.hosts["db"].addresses["back"]
        return Database(
            name=name,
            url=f"postgresql://ingest:{self.password}@{addr}:{self.db_port}/{name}",
            local=f"postgresql://postgres@127.0.0.1:{self.db_port}/{name}",
        )


def _fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    # asyncio.run in the calling thread: the connection is made in that thread's namespace.
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def why_not() -> str | None:
    if reason := unavailable():
        return reason
    if find_mosquitto() is None:
        return "the hosts room needs a mosquitto binary (the embedded broker listens on 127.0.0.1 only)"
    if local_postgres_bindir() is None and pgserver_bindir() is None:
        return "the hosts room needs PostgreSQL binaries (initdb/pg_ctl, or the pgserver wheel)"
    return None


def servers(stack: ExitStack, net: Network) -> Lab:
    """The broker and the database, each started in its host's namespace."""
    broker_addr = net.hosts["broker"].addresses["front"]
    net.call(
        "broker",
        lambda: stack.enter_context(
            Mosquitto(
                {"max_inflight_messages": str(INFLIGHT)},
                listeners=[Listener(port=BROKER_PORT, host=broker_addr)],
            )
        ),
    )
    db_addr = net.hosts["db"].addresses["back"]
    subnet = f"{NETS['back']}.0/24"
    postgres = net.call(
        "db",
        lambda: stack.enter_context(
            PostgresCluster(
                settings={"listen_addresses": f"127.0.0.1,{db_addr}"},
                hba=[f"host all ingest {subnet} scram-sha-256"],
                bindir=local_postgres_bindir() or pgserver_bindir(),
            )
        ),
    )
    password = uuid.uuid4().hex
    admin = f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    net.call("db", _fetch, admin, f"CREATE ROLE ingest LOGIN CREATEROLE PASSWORD '{password}'")
    return Lab(
        net=net,
        broker_url=f"mqtt://{broker_addr}:{BROKER_PORT}",
        db_port=postgres.port,
        password=password,
    )
