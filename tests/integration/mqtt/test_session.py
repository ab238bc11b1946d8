"""The MQTT adapter (ingest.mqtt.session) against a real broker: the fast read path really is
the one that reads a drain, and a PUBLISH over the payload limit is read in pieces, kept in
part with its size, acknowledged like any other, and never redelivered."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from ingest.mqtt.session import MqttSession
from ingest.mqtt.wire import Inbound
from ingest.settings import MqttEndpoint
from tests.integration.support import Publisher

MAX_PAYLOAD = 1000


def new_session(url: str, client_id: str, protocol: str) -> MqttSession:
    return MqttSession(
        MqttEndpoint.parse(url),
        client_id=client_id,
        protocol=protocol,
        keepalive=30,
        receive_maximum=1000,
        session_expiry=300,
        max_payload=MAX_PAYLOAD,
    )


async def take(session: MqttSession, count: int, topic_filter: str) -> list[Inbound]:
    """Subscribe, read ``count`` messages, acknowledging them as they come (the broker's
    in-flight window holds the rest back until then)."""
    suback = session.subscribe(topic_filter, 1)
    got: list[Inbound] = []
    while len(got) < count:
        await session.wait_inbox()
        taken = []
        while session.inbox:
            taken.append(session.take())
        assert session.inbox_bytes == 0
        assert session.ack_many([(m[3], m[2]) for m in taken]) == len(taken)
        got += taken
    await suback
    return got


def run_session(
    url: str, client_id: str, protocol: str, count: int, topic_filter: str
) -> tuple[list[Inbound], MqttSession]:
    async def main() -> tuple[list[Inbound], MqttSession]:
        session = new_session(url, client_id, protocol)
        async with session.client:
            got = await take(session, count, topic_filter)
            await asyncio.sleep(0)  # let the PUBACK write go out before DISCONNECT
        return got, session

    return asyncio.run(main())


def create_session(url: str, client_id: str, protocol: str, topic_filter: str) -> None:
    """Connect once and subscribe, so that the broker queues what is published meanwhile."""

    async def main() -> None:
        session = new_session(url, client_id, protocol)
        async with session.client:
            await session.subscribe(topic_filter, 1)

    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_drain_is_read_by_the_fast_path(mqtt_url: str, protocol: str) -> None:
    prefix = f"fast{uuid.uuid4().hex[:8]}"
    client_id = f"{prefix}-daemon"
    create_session(mqtt_url, client_id, protocol, f"{prefix}/#")
    count = 3000
    with Publisher(mqtt_url) as pub:
        pub.publish_many((f"{prefix}/dev-{i % 7}", b'{"v": %d}' % i) for i in range(count))
    got, session = run_session(mqtt_url, client_id, protocol, count, f"{prefix}/#")
    assert sorted(int(m[1][6:-1]) for m in got) == list(range(count))
    stats = session.statistics()
    assert stats.fast_path + stats.paho_path == count
    # paho reads only what the fast path leaves (a packet split across two reads): if the fast
    # path were switched off, paho would have read everything.
    assert stats.fast_path > 0.9 * count, stats


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_oversized_publishes_are_kept_in_part_and_acknowledged(
    mqtt_url: str, protocol: str
) -> None:
    prefix = f"big{uuid.uuid4().hex[:8]}"
    client_id = f"{prefix}-daemon"
    create_session(mqtt_url, client_id, protocol, f"{prefix}/#")
    sizes = [10, MAX_PAYLOAD, MAX_PAYLOAD + 1, 10, 200_000, 70_000, 10]
    with Publisher(mqtt_url) as pub:
        pub.publish_many((f"{prefix}/m{i}", bytes([97 + i]) * size) for i, size in enumerate(sizes))
    got, session = run_session(mqtt_url, client_id, protocol, len(sizes), f"{prefix}/#")
    assert [m[0] for m in got] == [f"{prefix}/m{i}" for i in range(len(sizes))]  # in order
    for i, (size, (_, payload, qos, mid, full)) in enumerate(zip(sizes, got, strict=True)):
        assert qos == 1 and mid > 0
        if size <= MAX_PAYLOAD:
            assert (payload, full) == (bytes([97 + i]) * size, None)
        else:
            assert full == size
            assert payload == bytes([97 + i]) * min(size, 65536)
    assert session.statistics().too_large == 3
    # Acknowledged: nothing comes back on the next connection, only what is published then.
    with Publisher(mqtt_url) as pub:
        pub.publish_many([(f"{prefix}/after", b"sentinel")])
    again, _ = run_session(mqtt_url, client_id, protocol, 1, f"{prefix}/#")
    assert [(m[0], m[1]) for m in again] == [(f"{prefix}/after", b"sentinel")]
