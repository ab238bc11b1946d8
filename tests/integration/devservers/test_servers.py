"""The server fixtures themselves: every other integration test stands on them."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import aiomqtt
import anyio
import asyncpg
import pytest

from ingest.devservers.throwaway import MosquittoFactory, PostgresFactory

pytestmark = pytest.mark.anyio


def _client(
    url: str, identifier: str | None = None, clean_session: bool | None = None
) -> aiomqtt.Client:
    parts = urlsplit(url)
    assert parts.hostname is not None
    return aiomqtt.Client(
        parts.hostname, parts.port or 1883, identifier=identifier, clean_session=clean_session
    )


async def _receive(client: aiomqtt.Client, n: int) -> list[bytes]:
    got: list[bytes] = []
    with anyio.fail_after(10):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            got.append(message.payload)
            if len(got) == n:
                break
    return got


async def test_database_url_is_fresh_and_writable(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        assert tables == 0
        await conn.execute("CREATE TABLE t (x int PRIMARY KEY)")
        await conn.execute("INSERT INTO t VALUES (1), (2)")
        assert await conn.fetchval("SELECT sum(x) FROM t") == 3
    finally:
        await conn.close()


async def test_mqtt_qos1_roundtrip(mqtt_url: str) -> None:
    topic = f"test/{uuid.uuid4().hex}"
    async with _client(mqtt_url) as sub, _client(mqtt_url) as pub:
        await sub.subscribe(topic, qos=1)
        for i in range(3):
            await pub.publish(topic, f"m{i}".encode(), qos=1)
        assert await _receive(sub, 3) == [b"m0", b"m1", b"m2"]


async def test_factory_mosquitto_restarts_on_the_same_port(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory({"max_inflight_messages": "20"})
    assert "max_inflight_messages 20\n" in (broker.dir / "mosquitto.conf").read_text()
    port = broker.port
    async with _client(broker.url) as client:
        await client.publish("test/a", b"1", qos=1)
    broker.kill()
    broker.restart()
    assert broker.port == port
    async with _client(broker.url) as client:
        await client.publish("test/a", b"2", qos=1)


async def test_factory_postgres_restarts_and_keeps_commits(
    postgres_factory: PostgresFactory,
) -> None:
    cluster = postgres_factory()
    dsn = cluster.create_database("app")
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    await conn.close()

    cluster.restart()  # fast: a clean shutdown
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO t VALUES (2)")
    await conn.close()

    cluster.restart("immediate")  # like a crash: every commit must survive recovery
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT sum(x) FROM t") == 3
    finally:
        await conn.close()


async def test_persistent_session_keeps_queued_messages_across_broker_restart(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory()
    topic, client_id = "test/persist", f"persist-{uuid.uuid4().hex[:8]}"
    async with _client(broker.url, identifier=client_id, clean_session=False) as sub:
        await sub.subscribe(topic, qos=1)
    async with _client(broker.url) as pub:
        for i in range(10):
            await pub.publish(topic, str(i).encode(), qos=1)

    broker.restart()  # SIGTERM: the broker writes sessions and queues to its persistence file

    # No subscribe: the session and its queue come back from the broker.
    async with _client(broker.url, identifier=client_id, clean_session=False) as sub:
        assert await _receive(sub, 10) == [str(i).encode() for i in range(10)]
