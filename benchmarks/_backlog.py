"""The pre-queued backlog: persistent sessions, payloads, and a fast publisher.

Every consumer gets the same backlog: its persistent session (``clean_session=False``, QoS 1
subscription) is registered first, then the messages are published once and the broker queues
a copy for each session.

With ``fmt="value"`` the same logical samples go out one value per topic, as the ``value``
route format reads them: every reading of a sample is its own message on
``devices/<id>/<metric>``, payload ``{"ts": <epoch ms>, "value": <number>}`` (the sample's
``ts``, so a device's messages never collapse on one receive time); ``--messages`` still
counts MQTT messages, so each carries one row.

Publishing goes through ``mosquitto_pub -l -q 1`` (a C client, one message per stdin line), one
process per device topic, ``--publishers`` of them at once. Measured here for 100,000 messages
over 100 devices: ~3.2 s with 16 at once and ``-M 1000``, ~4.5 s with 8, ~10 s with 2; a paho
publisher needs tens of seconds (it rescans its queue on every PUBACK).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.urls import MqttEndpoint, parse_mqtt_url

__all__ = [
    "FORMATS",
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
FORMATS = ("json", "value")
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
    messages: int
    rows: int
    mean_payload_bytes: float
    topic_filter: str = TOPIC_FILTER  # what the consumers' sessions subscribe to


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
    and ``seq`` unique per device. A string field (``fw``: counted by the daemon, not stored)
    pads single-sample payloads to about ``payload_bytes``."""
    if fmt == "value":
        return _value_backlog(messages=messages, devices=devices, readings=readings)
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


def publish(url: str, backlog: Backlog, *, parallel: int = 16, inflight: int = 1000) -> float:
    """Publish the backlog with QoS 1 (``mosquitto_pub -l``); returns the seconds it took."""
    broker = broker_address(url)
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
