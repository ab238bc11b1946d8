"""The server fixtures themselves: every other integration test stands on them."""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
import anyio
import asyncpg
import pytest

from ingest.devservers.brokers import Listener
from ingest.devservers.throwaway import MosquittoFactory, PostgresFactory
from ingest.devservers.tls import make_tls_files, mosquitto_password_file

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


async def test_factory_mosquitto_tls_listener_and_password_file(
    mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    passwords = mosquitto_password_file(tmp_path / "passwd", {"ingest": "s3cret"})
    broker = mosquitto_factory(
        listeners=[
            Listener(
                cafile=tls.ca,
                certfile=tls.server_cert,
                keyfile=tls.server_key,
                require_certificate=True,
            )
        ],
        password_file=passwords,
        allow_anonymous=False,
    )
    plain, secure = broker.ports
    assert plain == broker.port and secure not in (0, plain)
    client_tls = aiomqtt.TLSParameters(
        ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key)
    )
    async with aiomqtt.Client(
        "127.0.0.1", secure, username="ingest", password="s3cret", tls_params=client_tls
    ) as client:
        await client.subscribe("test/tls", qos=1)
        await client.publish("test/tls", b"sealed", qos=1)
        assert await _receive(client, 1) == [b"sealed"]
    with pytest.raises(aiomqtt.MqttError):  # no anonymous clients any more
        async with _client(broker.url):
            pass
    with pytest.raises(aiomqtt.MqttError):  # the TLS listener wants a client certificate
        no_cert = aiomqtt.TLSParameters(ca_certs=str(tls.ca))
        async with aiomqtt.Client(
            "127.0.0.1", secure, username="ingest", password="s3cret", tls_params=no_cert
        ):
            pass
    broker.restart()
    assert broker.ports == (plain, secure)


async def test_factory_postgres_takes_settings_and_hba_lines(
    postgres_factory: PostgresFactory, tmp_path: Path
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    cluster = postgres_factory(
        settings={
            "ssl": "on",
            "ssl_cert_file": str(tls.server_cert),
            "ssl_key_file": str(tls.server_key),
        },
        hba=["hostnossl all all 127.0.0.1/32 reject"],
    )
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(cluster.dsn(), ssl=False)
    context = ssl.create_default_context(cafile=str(tls.ca))
    cluster.restart()  # the settings outlive a restart
    conn = await asyncpg.connect(cluster.dsn(), ssl=context)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
