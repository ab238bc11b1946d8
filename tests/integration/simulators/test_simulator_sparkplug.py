"""``simulate --format sparkplug`` against a real broker (no daemon): what a Sparkplug host
would see, in order, through a broker restart: a new ``bdSeq``, the births again before any
data, data only by aliases the births declared."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiomqtt

from ingest.devservers.throwaway import MosquittoFactory
from ingest.formats.sparkplug_schema import Payload
from simulators._config import parse_mqtt_url
from tests.integration.simulators.test_simulator import finish_cli, start_cli


async def _collect(
    client: aiomqtt.Client, out: list[tuple[str, Any]], until: int, done: asyncio.Event
) -> None:
    async for message in client.messages:
        assert isinstance(message.payload, bytes | bytearray)
        out.append((str(message.topic), Payload.FromString(bytes(message.payload))))
        if len(out) >= until:
            done.set()


async def _watch(
    url: str, group: str, out: list[tuple[str, Any]], until: int, session: str
) -> None:
    """Collect the group's messages until ``out`` holds ``until``, in a persistent session:
    the broker keeps what comes while we are away, across its restart too."""
    endpoint = parse_mqtt_url(url)
    async with aiomqtt.Client(
        endpoint.host, endpoint.port, identifier=session, clean_session=False
    ) as client:
        await client.subscribe(f"spBv1.0/{group}/#", qos=1)
        done = asyncio.Event()
        reader = asyncio.create_task(_collect(client, out, until, done))
        try:
            async with asyncio.timeout(30):
                await done.wait()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def _check_session(messages: list[tuple[str, Any]], group: str) -> int:
    """Births before data, data by declared aliases only; returns the session's bdSeq."""
    declared: set[int] = set()
    bdseq = -1
    for topic, p in messages:
        kind = topic.split("/")[2]
        if kind == "NBIRTH":
            assert p.seq == 0
            bdseq = next(m.long_value for m in p.metrics if m.name == "bdSeq")
            declared = {m.alias for m in p.metrics if m.HasField("alias")}
        elif kind == "DBIRTH":
            declared |= {m.alias for m in p.metrics}
        elif kind == "DDATA":
            assert bdseq >= 0, "data before the NBIRTH"
            aliases = {m.alias for m in p.metrics}
            assert aliases <= declared and not any(m.name for m in p.metrics), topic
    return bdseq


def test_a_node_reborn_after_a_broker_restart(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory()
    group = f"r{uuid.uuid4().hex[:8]}"
    session = f"watch-{group}"
    before: list[tuple[str, Any]] = []
    after: list[tuple[str, Any]] = []

    async def scenario() -> tuple[int, dict[str, Any]]:
        proc = await start_cli(
            "--mqtt-url", broker.url, "--format", "sparkplug", "--group-id", group,
            "--devices", "3", "--rate", "20", "--duration", "6", "--quiet",
        )  # fmt: skip
        await _watch(broker.url, group, before, 1, session)  # it publishes: pull the broker
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(broker.start)
        # The node reconnects within its backoff (at most 5 s) and is born again first.
        await _watch(broker.url, group, after, 40, session)
        code, report, _err = await finish_cli(proc)
        return code, report

    code, report = asyncio.run(scenario())
    assert code == 1 and report["reconnects"] == 1, report  # what was due meanwhile failed
    # What the broker held of the first connection comes first (its device births too, when the
    # first watch left before they came), with its will (the NDEATH of bdSeq 0, published by the
    # broker), then the second connection is born: it publishes its NBIRTH before anything else.
    kinds = [topic.split("/")[2] for topic, _ in after]
    born = kinds.index("NBIRTH")
    assert set(kinds[:born]) <= {"DBIRTH", "DDATA", "NDEATH"}, kinds
    assert kinds[:born].count("NDEATH") == 1, kinds
    wills = [p for topic, p in after[:born] if "/NDEATH/" in topic]
    assert [m.long_value for p in wills for m in p.metrics] == [0] * len(wills)
    assert not any(p.HasField("timestamp") for p in wills)
    assert kinds[born : born + 4] == ["NBIRTH", "DBIRTH", "DBIRTH", "DBIRTH"], kinds
    assert _check_session(after[born:], group) == 1  # the second connection's bdSeq
    sp = report["sparkplug"]
    assert sp["births"] == 2 and sp["device_births"] == 6, sp
