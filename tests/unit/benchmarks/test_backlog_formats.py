"""The drain benchmark's senml, senml-cbor and sparkplug backlogs: the same samples as the JSON
backlog, decoded by the daemon's own decoder through the route table drain gives it, the rows
the benchmark expects; and the socket publisher that carries binary payloads to a real broker.
The drains themselves are run by hand (benchmarks/README.md)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks import decode as decode_bench
from benchmarks import drain
from benchmarks._backlog import (
    DEVICES_PER_NODE,
    FW,
    Backlog,
    broker_address,
    make_backlog,
    publish,
    publish_raw,
)
from ingest.formats.decode import decode
from ingest.formats.sparkplug_schema import Payload
from ingest.model import Decoded


def _backlog(fmt: str, messages: int = 300, devices: int = 20) -> Backlog:
    return make_backlog(
        messages=messages, devices=devices, readings=5, samples=None, payload_bytes=0, fmt=fmt
    )


def _decoded(fmt: str, backlog: Backlog) -> list[Decoded]:
    """Every data message decoded (births first) through the route table drain gives."""
    at = datetime.now(UTC)
    case = decode_bench.prepare(fmt, backlog, at)
    out = []
    for topic, payload in case.messages:
        result = decode(topic, payload, at, case.routes)
        assert isinstance(result, Decoded), result
        out.append(result)
    return out


def _samples(results: list[Decoded]) -> set[tuple[str, int]]:
    """(device, seq) of every message: the JSON backlog's samples, one each."""
    return {
        (r.device_id.rsplit("/", 1)[-1], int(r.value))
        for d in results
        for r in d.readings
        if r.metric == "seq"
    }


@pytest.mark.parametrize("fmt", ["json", "senml", "senml-cbor", "sparkplug"])
def test_each_format_carries_five_numbers_and_fw_per_sample(fmt: str) -> None:
    backlog = _backlog(fmt)
    results = _decoded(fmt, backlog)
    for d in results:
        assert sorted(r.metric for r in d.readings) == sorted(
            ["seq", "temperature", "humidity", "battery", "rssi"]
        )
        assert [(t.metric, t.value) for t in d.texts] == [("fw", FW)]
    json_results = _decoded("json", _backlog("json", messages=len(results)))
    assert _samples(results) == _samples(json_results)
    assert len(_samples(results)) == len(results)


def test_sparkplug_births_come_first_and_count_among_the_messages() -> None:
    devices, messages = 25, 400
    backlog = _backlog("sparkplug", messages, devices)
    nodes = -(-devices // DEVICES_PER_NODE)
    nbirths, dbirths = backlog.preamble
    assert len(nbirths) == nodes and all(len(p) == 1 for p in nbirths.values())
    assert len(dbirths) == devices and all(len(p) == 1 for p in dbirths.values())
    data = sum(len(p) for p in backlog.lines.values())
    assert data + nodes + devices == backlog.messages == messages
    # Five rows a DDATA, and the NBIRTH's bdSeq one row of each node.
    assert backlog.rows == data * 5 + nodes
    assert backlog.binary and backlog.topic_filter == "spBv1.0/#"
    assert {t.split("/")[2] for t in backlog.lines} == {"DDATA"}
    # A node numbers its messages from its NBIRTH's 0: its DBIRTHs, then its data.
    first = Payload.FromString(backlog.lines["spBv1.0/bench/DDATA/node-0001/dev-00001"][0])
    assert first.seq == DEVICES_PER_NODE + 1
    last_node = Payload.FromString(backlog.lines["spBv1.0/bench/DDATA/node-0003/dev-00021"][0])
    assert last_node.seq == devices - 2 * DEVICES_PER_NODE + 1


def test_senml_cbor_is_binary_and_senml_json_goes_through_mosquitto_pub() -> None:
    cbor, text = _backlog("senml-cbor"), _backlog("senml")
    assert cbor.binary and not text.binary
    # CBOR major type 4, six items: the sample's six records, one pack.
    assert all(p[0] == 0x86 for ps in cbor.lines.values() for p in ps)
    assert all(b"\n" not in p for ps in text.lines.values() for p in ps)
    assert cbor.rows == text.rows == 300 * 5


def test_drain_gives_each_format_its_route_and_wants_naive_skipped() -> None:
    for fmt in ("senml", "senml-cbor", "sparkplug"):
        with pytest.raises(SystemExit):
            drain.main(["--format", fmt])
        assert drain._parser().parse_args(["--format", fmt]).format == fmt


@contextmanager
def _received(
    mqtt_url: str, topic_filter: str, count: int, timeout: float
) -> Iterator[list[bytes]]:
    """A QoS 1 subscriber to ``topic_filter``: the payloads it got, in order; on leaving the
    block it waits (``timeout`` seconds at most) until ``count`` have come."""
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        got.append(bytes(message.payload))
        if len(got) == count:
            done.set()

    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    broker = broker_address(mqtt_url)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe(topic_filter, qos=1)
        assert subscribed.wait(30)
        yield got
        assert done.wait(timeout), f"{len(got)} of {count} received: {got[-3:]}"
    finally:
        client.disconnect()
        client.loop_stop()


def test_raw_publisher_delivers_binary_payloads_whole_and_in_order(mqtt_url: str) -> None:
    topic = f"bench-test/{uuid.uuid4().hex}"
    payloads = [bytes([i % 256, 10, 13, 0, 10]) + i.to_bytes(4, "big") for i in range(2500)]
    with _received(mqtt_url, topic, len(payloads), timeout=120) as got:
        # A window smaller than the payloads: the publisher must wait for PUBACKs on the way.
        publish_raw(broker_address(mqtt_url), topic, payloads, inflight=100)
    assert got == payloads


def test_publish_sends_the_preamble_before_the_data(mqtt_url: str) -> None:
    base = f"bench-test/{uuid.uuid4().hex}"
    backlog = Backlog(
        lines={f"{base}/data": [b"d\n1", b"d\n2"]},
        messages=4,
        rows=0,
        mean_payload_bytes=3,
        preamble=({f"{base}/first": [b"f"]}, {f"{base}/second": [b"s"]}),
        binary=True,
    )
    with _received(mqtt_url, f"{base}/#", 4, timeout=60) as got:
        publish(mqtt_url, backlog)
    assert got == [b"f", b"s", b"d\n1", b"d\n2"]
