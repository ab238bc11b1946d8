"""The session's inbox is bounded in bytes as well as in messages (docs/design.md, Limits): it
stops reading the socket once it holds more payload bytes than ``max_inbox_bytes`` and reads
again at half. Driven through a socket pair by the event loop, as a broker connection is."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import paho.mqtt.client as paho
import pytest

from ingest.errors import ConfigError
from ingest.mqtt.session import MqttSession
from ingest.settings import MqttEndpoint, Settings
from tests.unit.mqtt.test_session_parse import publish

PAYLOAD = 10_000
BOUND = 16_000  # more than one payload, less than two: the inbox pauses at the second


def new_session(*, max_inbox_bytes: int = BOUND, receive_maximum: int = 1000) -> MqttSession:
    return MqttSession(
        MqttEndpoint.parse("mqtt://127.0.0.1:1883"),
        client_id="inbox-bytes-test",
        protocol="3.1.1",
        keepalive=30,
        receive_maximum=receive_maximum,
        session_expiry=0,
        max_inbox_bytes=max_inbox_bytes,
    )


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never met")


def packets(first_mid: int, count: int) -> bytes:
    return b"".join(
        publish(b"d/1/telemetry", bytes([mid % 256]) * PAYLOAD, mid=mid)
        for mid in range(first_mid, first_mid + count)
    )


def test_reading_pauses_over_the_bytes_bound_and_resumes_at_half() -> None:
    async def run() -> None:
        ours, broker = socket.socketpair()
        ours.setblocking(False)
        session = new_session()
        session._paho._sock = ours  # what paho holds once connected
        try:
            session._install_reader(ours.fileno())
            broker.sendall(packets(1, 2))
            await until(lambda: len(session.inbox) == 2)
            assert session.paused, "20,000 bytes held, over the 16,000 bound"
            assert session.inbox_bytes == 2 * PAYLOAD
            broker.sendall(packets(3, 2))
            await asyncio.sleep(0.05)  # the loop runs; a reader still registered would read
            assert len(session.inbox) == 2, "read while paused"
            assert session.take()[3] == 1
            assert session.paused, "10,000 bytes held: above half the bound, still paused"
            assert session.inbox_bytes == PAYLOAD
            assert session.take()[3] == 2
            assert not session.paused
            await until(lambda: len(session.inbox) == 2)
            assert [m[3] for m in session.inbox] == [3, 4]
            assert session.inbox_bytes == 2 * PAYLOAD
            assert session.statistics().fast_path == 4
        finally:
            session.closed = True
            asyncio.get_running_loop().remove_reader(ours.fileno())
            session._paho._sock = None
            ours.close()
            broker.close()

    asyncio.run(run())


def test_the_message_window_still_pauses_alone() -> None:
    async def run() -> None:
        ours, broker = socket.socketpair()
        ours.setblocking(False)
        session = new_session(max_inbox_bytes=1 << 30, receive_maximum=3)
        session._paho._sock = ours
        try:
            session._install_reader(ours.fileno())
            broker.sendall(b"".join(publish(b"t/x", b"{}", mid=m) for m in range(1, 6)))
            await until(lambda: len(session.inbox) == 3)
            assert session.paused
            assert session.inbox_bytes == 3 * 2
        finally:
            session.closed = True
            asyncio.get_running_loop().remove_reader(ours.fileno())
            session._paho._sock = None
            ours.close()
            broker.close()

    asyncio.run(run())


def test_messages_paho_delivers_are_counted_and_discard_forgets_them() -> None:
    async def run() -> None:
        session = new_session()
        for mid in (1, 2):
            msg = paho.MQTTMessage(mid=mid, topic=b"t/x")
            msg.payload = b"p" * 300
            msg.qos = 1
            session._on_message(None, None, msg)
        assert (len(session.inbox), session.inbox_bytes) == (2, 600)
        assert session.statistics().paho_path == 2
        assert session.discard() == 2
        assert (len(session.inbox), session.inbox_bytes) == (0, 0)

    asyncio.run(run())


def test_the_bytes_bound_must_hold_the_largest_message() -> None:
    with pytest.raises(ConfigError, match=r"INGEST_MQTT_INFLIGHT_BYTES.*INGEST_MAX_PAYLOAD_BYTES"):
        Settings(mqtt_inflight_bytes=1_000_000, max_payload_bytes=1_048_576)
    assert Settings(mqtt_inflight_bytes=1_048_576).mqtt_inflight_bytes == 1_048_576
