"""The pre-queued backlog: persistent sessions, payloads, and a fast publisher.

Every consumer gets the same backlog: its persistent session (``clean_session=False``, QoS 1
subscription) is registered first, then the messages are published once and the broker queues
a copy for each session.

With ``fmt="value"`` the same logical samples go out one value per topic, as the ``value``
route format reads them: every reading of a sample is its own message on
``devices/<id>/<metric>``, payload ``{"ts": <epoch ms>, "value": <number>}`` (the sample's
``ts``, so a device's messages never collapse on one receive time); ``--messages`` still
counts MQTT messages, so each carries one row.

With ``fmt="senml"`` / ``"senml-cbor"`` each message is the JSON backlog's sample (its readings
and ``fw``) as one RFC 8428 pack on the same topic (the simulator's encoder), in JSON or CBOR.
With ``fmt="sparkplug"`` the devices sit under edge nodes (``DEVICES_PER_NODE`` each, group
``bench``): one NBIRTH per node (its ``bdSeq``: one row), then one DBIRTH per device declaring
the aliases (null values: no rows), then each sample as a DDATA by alias. The births are
published before the data and count among ``--messages``.

Publishing goes through ``mosquitto_pub -l -q 1`` for text payloads, and through a plain
socket writing pre-encoded QoS 1 PUBLISH packets for binary ones (CBOR and protobuf payloads
may hold a newline, which ``-l`` would split on).

The text publisher: ``mosquitto_pub -l -q 1`` (a C client, one message per stdin line), one
process per device topic, ``--publishers`` of them at once. Measured here for 100,000 messages
over 100 devices: ~3.2 s with 16 at once and ``-M 1000``, ~4.5 s with 8, ~10 s with 2; a paho
publisher needs tens of seconds (it rescans its queue on every PUBACK).
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.formats.sparkplug_schema import DataType, Payload
from ingest.mqtt.wire import connect_packet, encode_string, publish_packet
from ingest.urls import MqttEndpoint, parse_mqtt_url
from simulators._senml import encoder as senml_encoder

__all__ = [
    "DEVICES_PER_NODE",
    "FORMATS",
    "ROUTES",
    "SPARKPLUG_GROUP",
    "VALUE_ROUTES",
    "Backlog",
    "broker_address",
    "device_id",
    "dumps",
    "make_backlog",
    "publish",
    "queued_for",
    "register_sessions",
    "sample_body",
    "wipe_sessions",
]

TOPIC_FILTER = "devices/+/telemetry"
VALUE_FILTER = "devices/+/+"
# The route table ``ingest run --config`` gets for a value-per-topic backlog.
VALUE_ROUTES = '[[routes]]\ntopic = "devices/{device_id}/{metric}"\nformat = "value"\n'
SENML_ROUTES = '[[routes]]\ntopic = "devices/{device_id}/telemetry"\nformat = "senml"\n'
SPARKPLUG_ROUTES = '[[routes]]\ntopic = "spBv1.0/#"\nformat = "sparkplug"\n'
FORMATS = ("json", "value", "senml", "senml-cbor", "sparkplug")
#: The ``--config`` route table of each format that is not the default route's.
ROUTES = {
    "value": VALUE_ROUTES,
    "senml": SENML_ROUTES,
    "senml-cbor": SENML_ROUTES,
    "sparkplug": SPARKPLUG_ROUTES,
}
SPARKPLUG_GROUP = "bench"
SPARKPLUG_FILTER = "spBv1.0/#"
DEVICES_PER_NODE = 10
FW = "bench-1.4.2"
_METRICS = ("temperature", "humidity", "battery", "rssi", "pressure", "co2", "voltage", "lux")


def broker_address(url: str) -> MqttEndpoint:
    """The plain listener ``url`` names (the project's URL parser). The backlog, the sessions
    and the broker checks always go through a plain listener, also when the consumers drain
    over TLS, so publishing costs the same either way."""
    endpoint = parse_mqtt_url(url)
    if endpoint.tls:
        raise ValueError("the backlog is published over a plain mqtt:// listener, not mqtts://")
    return endpoint


def device_id(index: int) -> str:
    """``dev-00001`` for index 0, like the simulator."""
    return f"dev-{index + 1:05d}"


@dataclass(frozen=True, slots=True)
class Backlog:
    """Lines to publish per device topic, and what they must become."""

    lines: dict[str, list[bytes]]  # topic -> payloads
    messages: int  # all of them, the preamble's too
    rows: int
    mean_payload_bytes: float  # of ``lines``
    topic_filter: str = TOPIC_FILTER  # what the consumers' sessions subscribe to
    # Published before ``lines``, each group fully acknowledged before the next (births).
    preamble: tuple[dict[str, list[bytes]], ...] = ()
    binary: bool = False  # payloads may hold a newline: not for ``mosquitto_pub -l``


def dumps(value: Any) -> bytes:
    # Not orjson: its bytes keep a ~4 KB allocation each here (100,000 payloads: 400 MB of RSS).
    return json.dumps(value, separators=(",", ":")).encode()


def sample_body(ts: int, seq: int, readings: int) -> dict[str, Any]:
    # ``seq`` is numeric, so it is one of the readings (as in the simulator's payloads).
    sample: dict[str, Any] = {"ts": ts, "seq": seq}
    for j in range(readings - 1):
        name = _METRICS[j] if j < len(_METRICS) else f"m{j}"
        sample[name] = round(20.0 + ((seq * 7 + j * 13) % 1000) / 37.0, 2)
    return sample


def make_backlog(
    *,
    messages: int,
    devices: int,
    readings: int,
    samples: int | None,
    payload_bytes: int,
    fmt: str = "json",
) -> Backlog:
    """``messages`` spread round-robin over ``devices``; every sample has a ``ts`` (epoch ms)
    and ``seq`` unique per device. A string field (``fw``: a text reading, stored since storage v2;
    counted and skipped before, and with ``INGEST_MAX_TEXT_BYTES=1``) pads single-sample payloads to about ``payload_bytes`` (0: ``fw`` is ``bench-1.4.2``, as in
    the other formats' samples)."""
    if fmt == "value":
        return _value_backlog(messages=messages, devices=devices, readings=readings)
    if fmt in ("senml", "senml-cbor"):
        return _senml_backlog(
            messages=messages, devices=devices, readings=readings, cbor=fmt == "senml-cbor"
        )
    if fmt == "sparkplug":
        return _sparkplug_backlog(messages=messages, devices=devices, readings=readings)
    base_ms = int(time.time() * 1000) - 10 * messages * (samples or 1)
    lines: dict[str, list[bytes]] = {}
    seqs = [0] * devices
    total_bytes = 0
    for i in range(messages):
        d = i % devices
        topic = f"devices/{device_id(d)}/telemetry"
        if samples is None:
            seqs[d] += 1
            body = sample_body(base_ms + seqs[d], seqs[d], readings)
            body["fw"] = ""
            pad = payload_bytes - len(dumps(body))
            if payload_bytes <= 0:  # the other formats' samples exactly
                body["fw"] = FW
            else:
                body["fw"] = "bench-1.4.2-" + "x" * max(pad - 12, 0) if pad > 0 else ""
            payload = dumps(body)
        else:
            batch = []
            for _ in range(samples):
                seqs[d] += 1
                s = sample_body(base_ms + seqs[d], seqs[d], readings)
                s["fw"] = "bench-1.4.2"
                batch.append(s)
            payload = dumps(batch)
        total_bytes += len(payload)
        lines.setdefault(topic, []).append(payload)
    return Backlog(
        lines=lines,
        messages=messages,
        rows=messages * readings * (samples or 1),
        mean_payload_bytes=round(total_bytes / max(messages, 1), 1),
    )


def _value_backlog(*, messages: int, devices: int, readings: int) -> Backlog:
    """The samples of the JSON backlog, each reading a message of its own (``seq`` too)."""
    base_ms = int(time.time() * 1000) - 10 * messages
    lines: dict[str, list[bytes]] = {}
    seqs = [0] * devices
    total_bytes = sent = sample_no = 0
    while sent < messages:
        d = sample_no % devices
        sample_no += 1
        seqs[d] += 1
        body = sample_body(base_ms + seqs[d], seqs[d], readings)
        ts = body.pop("ts")
        for name, value in body.items():
            if sent == messages:
                break
            payload = dumps({"ts": ts, "value": value})
            lines.setdefault(f"devices/{device_id(d)}/{name}", []).append(payload)
            total_bytes += len(payload)
            sent += 1
    return Backlog(
        lines=lines,
        messages=messages,
        rows=messages,
        mean_payload_bytes=round(total_bytes / max(messages, 1), 1),
        topic_filter=VALUE_FILTER,
    )


def _samples(messages: int, devices: int, readings: int) -> list[tuple[int, dict[str, Any]]]:
    """The JSON backlog's single samples, ``fw`` included, as ``(device index, sample)``
    round-robin over the devices."""
    base_ms = int(time.time() * 1000) - 10 * messages
    seqs = [0] * devices
    out = []
    for i in range(messages):
        d = i % devices
        seqs[d] += 1
        sample = sample_body(base_ms + seqs[d], seqs[d], readings)
        sample["fw"] = FW
        out.append((d, sample))
    return out


def _senml_backlog(*, messages: int, devices: int, readings: int, cbor: bool) -> Backlog:
    """Each sample one SenML pack (``bn`` the device) on the JSON backlog's topic."""
    encode = senml_encoder("senml", cbor)
    assert encode is not None
    lines: dict[str, list[bytes]] = {}
    total_bytes = 0
    for d, sample in _samples(messages, devices, readings):
        payload = encode(device_id(d), [sample])
        lines.setdefault(f"devices/{device_id(d)}/telemetry", []).append(payload)
        total_bytes += len(payload)
    return Backlog(
        lines=lines,
        messages=messages,
        rows=messages * readings,
        mean_payload_bytes=round(total_bytes / max(messages, 1), 1),
        binary=cbor,
    )


def sparkplug_topic(kind: str, node: int, device: int | None = None) -> str:
    """``spBv1.0/bench/<kind>/node-0001[/dev-00001]``."""
    tail = "" if device is None else f"/{device_id(device)}"
    return f"spBv1.0/{SPARKPLUG_GROUP}/{kind}/node-{node + 1:04d}{tail}"


def _datatype(value: Any) -> DataType:
    if isinstance(value, str):
        return DataType.String
    return DataType.UInt64 if isinstance(value, int) else DataType.Double


def _set_value(metric: Any, value: Any) -> None:
    if isinstance(value, str):
        metric.string_value = value
    elif isinstance(value, int):
        metric.long_value = value
    else:
        metric.double_value = value


Births = tuple[dict[str, list[bytes]], dict[str, list[bytes]]]


def _sparkplug_births(devices: int, names: list[str], sample: dict[str, Any], ms: int) -> Births:
    """One NBIRTH per node (``bdSeq`` 0: one row of the node) and one DBIRTH per device
    declaring alias ``i + 1`` for ``names[i]`` with a null value (no row). A node's messages
    number ``seq`` from its NBIRTH's 0 on: its DBIRTHs 1.. ``DEVICES_PER_NODE``."""
    nodes: dict[str, list[bytes]] = {}
    births: dict[str, list[bytes]] = {}
    for node in range((devices + DEVICES_PER_NODE - 1) // DEVICES_PER_NODE):
        nbirth = Payload(timestamp=ms, seq=0)
        nbirth.metrics.add(name="bdSeq", datatype=DataType.UInt64, long_value=0)
        nodes[sparkplug_topic("NBIRTH", node)] = [nbirth.SerializeToString()]
    for d in range(devices):
        dbirth = Payload(timestamp=ms, seq=d % DEVICES_PER_NODE + 1)
        for i, name in enumerate(names):
            dbirth.metrics.add(
                name=name, alias=i + 1, datatype=_datatype(sample[name]), is_null=True
            )
        topic = sparkplug_topic("DBIRTH", d // DEVICES_PER_NODE, d)
        births[topic] = [dbirth.SerializeToString()]
    return nodes, births


def _sparkplug_backlog(*, messages: int, devices: int, readings: int) -> Backlog:
    """The JSON backlog's samples as DDATA by alias, after the births that declare them."""
    nodes = (devices + DEVICES_PER_NODE - 1) // DEVICES_PER_NODE
    data = messages - nodes - devices
    if data < devices:
        raise ValueError(f"sparkplug: {messages} messages leave too few for the data")
    samples = _samples(data, devices, readings)
    names = [k for k in samples[0][1] if k != "ts"]
    nbirths, dbirths = _sparkplug_births(devices, names, samples[0][1], samples[0][1]["ts"] - 1)
    lines: dict[str, list[bytes]] = {}
    topics = [sparkplug_topic("DDATA", d // DEVICES_PER_NODE, d) for d in range(devices)]
    total_bytes = 0
    # Each node's data goes on numbering after its births (the daemon does not check ``seq``,
    # and the topics of a node are published side by side, so they interleave anyway).
    seqs = [min(DEVICES_PER_NODE, devices - node * DEVICES_PER_NODE) for node in range(nodes)]
    for d, sample in samples:
        node = d // DEVICES_PER_NODE
        seqs[node] = (seqs[node] + 1) % 256
        payload = Payload(timestamp=sample["ts"], seq=seqs[node])
        for i, name in enumerate(names):
            _set_value(payload.metrics.add(alias=i + 1), sample[name])
        encoded = payload.SerializeToString()
        lines.setdefault(topics[d], []).append(encoded)
        total_bytes += len(encoded)
    return Backlog(
        lines=lines,
        messages=messages,
        rows=data * readings + nodes,
        mean_payload_bytes=round(total_bytes / max(data, 1), 1),
        topic_filter=SPARKPLUG_FILTER,
        preamble=(nbirths, dbirths),
        binary=True,
    )


def _client(client_id: str, protocol: str, *, clean: bool) -> paho.Client:
    v5 = protocol == "5"
    kwargs: dict[str, Any] = {
        "callback_api_version": CallbackAPIVersion.VERSION2,
        "client_id": client_id,
        "protocol": paho.MQTTv5 if v5 else paho.MQTTv311,
    }
    if not v5:
        kwargs["clean_session"] = clean
    return paho.Client(**kwargs)


def _connect(client: paho.Client, broker: MqttEndpoint, protocol: str, *, clean: bool) -> None:
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0 if clean else 0xFFFFFFFF
        client.connect(broker.host, broker.port, clean_start=clean, properties=props)
    else:
        client.connect(broker.host, broker.port)


def register_sessions(
    url: str, client_ids: list[str], protocol: str, topic_filter: str = TOPIC_FILTER
) -> None:
    """A persistent session with a QoS 1 subscription to ``topic_filter`` for each id, then
    disconnect."""
    broker = broker_address(url)
    for cid in client_ids:
        client = _client(cid, protocol, clean=False)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_args, done=subscribed: done.set()
        _connect(client, broker, protocol, clean=False)
        client.loop_start()
        try:
            client.subscribe(topic_filter, qos=1)
            if not subscribed.wait(10):
                raise RuntimeError(f"no SUBACK for {cid} from {url}")
        finally:
            client.disconnect()
            client.loop_stop()


def wipe_sessions(url: str, client_ids: list[str], protocol: str) -> None:
    """Discard the sessions (and what is queued for them): connect clean, disconnect."""
    broker = broker_address(url)
    for cid in client_ids:
        client = _client(cid, protocol, clean=True)
        connected = threading.Event()
        client.on_connect = lambda *_args, done=connected: done.set()
        _connect(client, broker, protocol, clean=True)
        client.loop_start()
        connected.wait(10)
        client.disconnect()
        client.loop_stop()


def queued_for(url: str, client_id: str, protocol: str, *, quiet: float = 1.0) -> int:
    """How many messages the broker still sends to ``client_id``'s session within ``quiet``
    seconds of silence. Nothing is acknowledged, so the session is left as it was; the count
    is capped by the broker's in-flight window (it is "at least", not "exactly")."""
    broker = broker_address(url)
    client = _client(client_id, protocol, clean=False)
    client.manual_ack_set(True)
    count = 0
    last = time.monotonic()

    def on_message(*_args: Any) -> None:
        nonlocal count, last
        count += 1
        last = time.monotonic()

    client.on_message = on_message
    _connect(client, broker, protocol, clean=False)
    client.loop_start()
    try:
        while time.monotonic() - last < quiet:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return count


def publish_raw(
    broker: MqttEndpoint, topic: str, payloads: list[bytes], *, inflight: int = 1000
) -> None:
    """Publish ``payloads`` to ``topic`` with QoS 1 over one plain socket, up to ``inflight``
    unacknowledged; returns once every PUBACK came. The packets are pre-encoded by the
    daemon's wire helpers: no MQTT client library in the way, binary payloads as they are."""
    with socket.create_connection((broker.host, broker.port), timeout=60) as sock:
        sock.sendall(connect_packet(f"bench-pub-{uuid.uuid4().hex[:12]}", keepalive=60))
        connack = _recv_exactly(sock, 4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"broker refused the publisher of {topic}: {connack.hex()}")
        field = encode_string(topic)
        sent = acked = 0
        pending = b""
        while acked < len(payloads):
            upto = min(len(payloads), acked + inflight)
            if sent < upto:
                sock.sendall(
                    b"".join(
                        publish_packet(field, payloads[i], i % 65535 + 1) for i in range(sent, upto)
                    )
                )
                sent = upto
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"broker closed the publisher of {topic} after {acked} acks")
            pending += chunk
            # PUBACKs only (4 bytes each): nothing else comes to a publisher without subscriptions
            whole = len(pending) // 4 * 4
            if any(pending[j] != 0x40 for j in range(0, whole, 4)):
                raise RuntimeError(f"unexpected packet for the publisher of {topic}")
            acked += whole // 4
            pending = pending[whole:]
        sock.sendall(b"\xe0\x00")  # DISCONNECT


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("broker closed the connection")
        data += chunk
    return data


def publish(url: str, backlog: Backlog, *, parallel: int = 16, inflight: int = 1000) -> float:
    """Publish the backlog with QoS 1, its preamble first, group by group; returns the
    seconds it took."""
    broker = broker_address(url)
    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        for group in backlog.preamble:
            list(
                pool.map(lambda item: publish_raw(broker, *item, inflight=inflight), group.items())
            )
        if backlog.binary:
            list(
                pool.map(
                    lambda item: publish_raw(broker, *item, inflight=inflight),
                    backlog.lines.items(),
                )
            )
            return time.monotonic() - started
    return time.monotonic() - started + _publish_lines(broker, backlog, parallel, inflight)


def _publish_lines(broker: MqttEndpoint, backlog: Backlog, parallel: int, inflight: int) -> float:
    """Text payloads, one a line, through ``mosquitto_pub -l``; returns the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        files: list[tuple[str, Path]] = []
        for n, (topic, payloads) in enumerate(backlog.lines.items()):
            path = Path(tmp) / f"{n}.txt"
            path.write_bytes(b"\n".join(payloads) + b"\n")
            files.append((topic, path))

        def one(item: tuple[str, Path]) -> None:
            topic, path = item
            with path.open("rb") as stdin:
                r = subprocess.run(
                    [
                        "mosquitto_pub",
                        *f"-h {broker.host} -p {broker.port} -q 1 -l -M {inflight}".split(),
                        *("-t", topic),
                    ],
                    stdin=stdin,
                    capture_output=True,
                    check=False,
                )
            if r.returncode != 0:
                raise RuntimeError(f"mosquitto_pub -t {topic} failed: {r.stderr.decode()}")

        started = time.monotonic()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, files))
        return time.monotonic() - started
