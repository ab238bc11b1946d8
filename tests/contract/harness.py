"""What the contract tests share.

* :func:`unconnected_session`: a real :class:`~ingest.mqtt.session.MqttSession` that never
  connected. What ``ack_many`` hands to paho stays in paho's outgoing queue (there is no socket
  to write it to), so :func:`wire` reads back the very bytes that would leave, in order.
* :func:`delivery`: a message as the source hands it on (decoded by the real decoder).
* :class:`FeedSource`: a source that hands the pipeline a fixed list of deliveries.
* :class:`HandWriter`: a writer the test completes (or fails) batch by batch, by hand.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ingest.flow.acker import Acker, Delivery
from ingest.flow.pipeline import BatchWriter, Pipeline, SourceFactory
from ingest.flow.writer import WriteResult
from ingest.formats.decode import decode, single_route
from ingest.model import Decoded, Envelope, SourceStatistics
from ingest.mqtt.session import MqttSession
from ingest.settings import Settings

TEMPLATE = "devices/{device_id}/telemetry"
LOG = logging.getLogger("tests.contract")


def puback(mid: int) -> bytes:
    """MQTT PUBACK, written out from the specification (3.1.1 §3.4, v5 §3.4 with the reason
    code omitted): type 4 in the high nibble, remaining length 2, the packet id."""
    return bytes((0x40, 0x02, mid >> 8, mid & 0xFF))


def pubcomp(mid: int) -> bytes:
    """MQTT PUBCOMP (3.1.1 §3.7): the last acknowledgement of a QoS 2 message."""
    return bytes((0x70, 0x02, mid >> 8, mid & 0xFF))


def ack_bytes(deliveries: Sequence[Delivery]) -> bytes:
    """The acknowledgements of ``deliveries``, in that order, as the broker should receive them."""
    out = b""
    for d in deliveries:
        if d.qos == 1:
            out += puback(d.mid)
        elif d.qos == 2:
            out += pubcomp(d.mid)
    return out


def session_for(settings: Settings) -> MqttSession:
    """A session as the source opens it for ``settings`` (same client id: same broker session)."""
    s = settings
    return MqttSession(
        s.mqtt_endpoint(),
        client_id=s.client_id,
        protocol=s.mqtt_protocol,
        keepalive=s.mqtt_keepalive,
        receive_maximum=s.mqtt_inflight,
        session_expiry=s.mqtt_session_expiry,
    )


def unconnected_session() -> MqttSession:
    return session_for(Settings(mqtt_url="mqtt://127.0.0.1:1883", client_id="contract-test"))


def wire(session: MqttSession) -> bytes:
    """Every byte queued for the broker on ``session``, in the order paho would write them."""
    return b"".join(bytes(p["packet"]) for p in session._paho._out_packet)


def delivery(
    session: MqttSession, mid: int, *, qos: int = 1, seq: int | None = None, t: float = 20.5
) -> Delivery:
    """Message ``seq`` (default: ``mid``) of device ``dev-1``, received on ``session``: two
    readings, ``seq`` and ``t``, at a timestamp that ``seq`` determines."""
    seq = mid if seq is None else seq
    topic = TEMPLATE.replace("{device_id}", "dev-1")
    payload = json.dumps({"ts": 1_700_000_000_000 + seq, "seq": seq, "t": t}).encode()
    now = datetime.now(UTC)
    result = decode(topic, payload, now, single_route(TEMPLATE))
    return Delivery(Envelope(topic, payload, now, result), session, mid, qos)


def seq_of(envelope: Envelope) -> int:
    return int(json.loads(envelope.payload)["seq"])


class FeedSource:
    """Hands the pipeline ``items`` at once (they are all in the channel before the first batch
    is cut), then waits for ``stop_reading`` and for the pipeline to drain, as the real source
    does before it disconnects."""

    def __init__(self, items: Sequence[Delivery], acker: Acker, drained: anyio.Event) -> None:
        self._items = list(items)
        self._acker = acker
        self._drained = drained
        self._stop = anyio.Event()

    @classmethod
    def factory(cls, items: Sequence[Delivery]) -> SourceFactory:
        return lambda acker, drained: cls(items, acker, drained)

    async def run(self, send: MemoryObjectSendStream[Delivery]) -> None:
        async with send:
            for item in self._items:
                self._acker.received(len(item.envelope.payload))
                send.send_nowait(item)
            await self._stop.wait()
        await self._drained.wait()

    def stop_reading(self) -> None:
        self._stop.set()

    def statistics(self) -> SourceStatistics:
        return SourceStatistics(
            received=len(self._items),
            decode_errors={},
            fields_skipped=0,
            connected=True,
            subscribed=True,
            connects=1,
        )


@dataclass
class Call:
    """One ``write`` the pipeline made: its batch, and the gate the test opens to finish it."""

    envelopes: list[Envelope]
    gate: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None

    @property
    def first_seq(self) -> int:
        return seq_of(self.envelopes[0])

    def commit(self) -> None:
        self.gate.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.gate.set()


class HandWriter:
    """A writer whose every ``write`` waits until the test commits or fails it."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._arrived = anyio.Event()

    async def write(self, envelopes: Sequence[Envelope], /) -> WriteResult:
        call = Call(list(envelopes))
        self.calls.append(call)
        self._arrived.set()
        await call.gate.wait()
        if call.error is not None:
            raise call.error
        rows = sum(len(e.result.readings) for e in envelopes if isinstance(e.result, Decoded))
        return WriteResult(inserted=rows)

    async def wait_calls(self, n: int) -> list[Call]:
        """Wait until ``n`` writes are in progress; returns them in receive order."""
        while len(self.calls) < n:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return sorted(self.calls, key=lambda c: c.first_seq)


def pipeline(
    items: Sequence[Delivery],
    writer: BatchWriter,
    *,
    concurrency: int = 1,
    settings: Settings | None = None,
) -> Pipeline:
    """A pipeline over ``items``, cut into ``concurrency`` batches written at once.

    The in-flight window is ``len(items)``: once they are all in hand nothing more can come, so
    the batcher never waits for its timer, and each batch holds its share of the window,
    ``len(items) // concurrency`` messages.
    """
    window = len(items)
    settings = replace(
        settings or Settings(),
        db_pool_size=concurrency,
        mqtt_inflight=window,
        channel_capacity=max(len(items), 1),
        batch_max_rows=100_000,
        batch_max_delay=60.0,
    )
    return Pipeline(settings, writer, source=FeedSource.factory(items), log=LOG)


async def run_to_end(p: Pipeline) -> None:
    """Run ``p`` until everything it was fed is written and acknowledged: a :class:`FeedSource`
    hands on all its items before it looks at ``stop_reading``, and the pipeline drains them."""
    with anyio.fail_after(60):  # a guard against a hang, not a timing assertion
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            p.stop_reading()


def bad_delivery(session: MqttSession, mid: int, payload: bytes = b"{not json") -> Delivery:
    """A message of device ``dev-1`` that does not decode (a dead letter ``not_json``)."""
    topic = TEMPLATE.replace("{device_id}", "dev-1")
    now = datetime.now(UTC)
    result = decode(topic, payload, now, single_route(TEMPLATE))
    return Delivery(Envelope(topic, payload, now, result), session, mid, 1)
