"""C5 crash-redelivery: a crash between commit and acknowledgement is redelivered by the broker
and absorbed (docs/contract.md, C5). Against a real Mosquitto and a real PostgreSQL.

Killing a daemon at exactly that moment is a matter of luck; this test makes the moment
instead. Messages of a persistent session are received and committed by the writer, and the
connection goes away before anything is acknowledged. The daemon's pipeline, connecting again
with the same client id, gets them all again, writes nothing new, counts them as duplicates and
acknowledges them: after that the broker holds nothing more for the session.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import anyio
import pytest

from ingest.flow.pipeline import Pipeline
from ingest.formats.decode import decode, single_route
from ingest.model import Envelope
from ingest.mqtt.session import MqttSession
from ingest.settings import Settings
from tests.contract.database import fetchval, migrated_writer
from tests.contract.harness import LOG, session_for
from tests.integration.support import Publisher, topic_for, unique_topic

pytestmark = pytest.mark.anyio
MESSAGES = 20
ROWS_PER_MESSAGE = 2


def payload(seq: int) -> bytes:
    return json.dumps({"ts": 1_700_000_000_000 + seq, "seq": seq, "t": 20.5}).encode()


async def publish(mqtt_url: str, topic: str, seqs: range) -> None:
    def send() -> None:
        with Publisher(mqtt_url) as pub:
            pub.publish_many([(topic, payload(seq)) for seq in seqs])

    await anyio.to_thread.run_sync(send)


async def receive(session: MqttSession, n: int) -> list[tuple[str, bytes]]:
    """Topic and payload of the first ``n`` messages the broker delivers on ``session`` (none
    acknowledged)."""
    while len(session.inbox) < n:
        await session.wait_inbox()
        await anyio.sleep(0.01)  # let more arrive before looking again
    return [session.take()[:2] for _ in range(n)]


async def test_C5_commit_then_lost_connection_is_redelivered_and_absorbed(
    database_url: str, mqtt_url: str
) -> None:
    template = unique_topic()
    topic = topic_for(template, "dev-1")
    settings = Settings(
        mqtt_url=mqtt_url,
        database_url=database_url,
        topic=template,
        client_id=f"contract-c5-{uuid.uuid4().hex[:8]}",
        batch_max_delay=0.05,
    )
    filter_ = single_route(template).routes[0].template.filter
    with anyio.fail_after(120):  # a guard against a hang, not a timing assertion
        async with await migrated_writer(database_url) as writer:
            # 1. The session exists at the broker, the messages wait there for it.
            first = session_for(settings)
            async with first.client:
                await first.subscribe(filter_, qos=1)
            await publish(mqtt_url, topic, range(MESSAGES))

            # 2. Received and committed; the connection is lost before any acknowledgement.
            second = session_for(settings)
            async with second.client:
                await second.subscribe(filter_, qos=1)
                inbound = await receive(second, MESSAGES)
                now = datetime.now(UTC)
                result = await writer.write(
                    [
                        Envelope(t, p, now, decode(t, p, now, single_route(template)))
                        for t, p in inbound
                    ]
                )
                assert result.inserted == MESSAGES * ROWS_PER_MESSAGE
                second.closed = True  # what the source does when a connection ends
            assert await fetchval(database_url, "SELECT count(*) FROM readings") == (
                MESSAGES * ROWS_PER_MESSAGE
            )

            # 3. The daemon's pipeline reconnects: the broker redelivers, the write absorbs.
            all_acknowledged = anyio.Event()

            def committed(*_: object) -> None:
                if p.statistics().acknowledged >= MESSAGES:
                    all_acknowledged.set()

            p = Pipeline(settings, writer, on_commit=committed, log=LOG)
            async with anyio.create_task_group() as tg:
                tg.start_soon(p.run)
                await all_acknowledged.wait()
                p.stop_reading()
            st = p.statistics()
            assert (st.received, st.rows_inserted) == (MESSAGES, 0)
            assert st.duplicates == MESSAGES * ROWS_PER_MESSAGE
            assert await fetchval(database_url, "SELECT count(*) FROM readings") == (
                MESSAGES * ROWS_PER_MESSAGE
            )

            # 4. Those acknowledgements reached the broker: the next message of the session
            #    is a new one, not a redelivery.
            fourth = session_for(settings)
            async with fourth.client:
                await fourth.subscribe(filter_, qos=1)
                await publish(mqtt_url, topic, range(MESSAGES, MESSAGES + 1))
                ((_topic, body),) = await receive(fourth, 1)
                assert json.loads(body)["seq"] == MESSAGES
