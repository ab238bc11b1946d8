"""A Sparkplug B route in a running daemon, with hand-built payloads (the schema's classes):
data before any birth becomes ``unknown_alias`` dead letters and one Rebirth NCMD that a test
subscriber sees; births, data, a stale death and deaths then land exactly."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho

from ingest.devservers import free_port
from ingest.formats.sparkplug_schema import DataType, Payload
from tests.integration.observability.test_observability import metric, metrics_env, scrape
from tests.integration.support import Daemon, Publisher, query, wait_until
from tests.sparkplug_payloads import sparkplug_payload

T0 = 1_700_000_000_000  # ms, 2023-11-14T22:13:20Z


def at(offset_ms: int) -> datetime:
    return datetime.fromtimestamp(T0 / 1000, UTC) + timedelta(milliseconds=offset_ms)


def message(offset_ms: int, *metrics: dict[str, Any]) -> bytes:
    return sparkplug_payload(T0 + offset_ms, *metrics)


class Subscriber:
    """Collects what arrives on one filter (paho's network thread)."""

    def __init__(self, mqtt_url: str, topic_filter: str) -> None:
        parts = urlsplit(mqtt_url)
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"sub-{uuid.uuid4().hex[:8]}",
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        self._client.subscribe(topic_filter, qos=0)
        self._client.loop_start()
        assert self._subscribed.wait(30), "no SUBACK"

    def _on_message(self, _client: Any, _userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def config(path: Path, group: str) -> Path:
    path.write_text(f'[[routes]]\ntopic = "spBv1.0/{group}/#"\nformat = "sparkplug"\n')
    return path


def births(group: str) -> list[tuple[str, bytes]]:
    node = message(
        0,
        {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 1},
        {"name": "temp", "alias": 1, "datatype": DataType.Double, "double_value": 20.5,
         "unit": "°C"},
    )  # fmt: skip
    device = message(
        1,
        {"name": "rpm", "alias": 10, "datatype": DataType.UInt32, "long_value": 1500,
         "unit": "rpm"},
        {"name": "fw", "alias": 11, "datatype": DataType.String, "string_value": "1.4.2"},
    )  # fmt: skip
    return [
        (f"spBv1.0/{group}/NBIRTH/edge1", node),
        (f"spBv1.0/{group}/DBIRTH/edge1/pump", device),
    ]


def test_rebirth_request_then_births_data_and_deaths(
    database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    port = free_port()
    early = [
        (f"spBv1.0/{group}/NDATA/edge1", message(-10, {"alias": 1, "double_value": 19.0})),
        (f"spBv1.0/{group}/DDATA/edge1/pump", message(-9, {"alias": 10, "long_value": 1})),
    ]
    ncmd = Subscriber(mqtt_url, f"spBv1.0/{group}/NCMD/#")
    env = metrics_env(port, INGEST_SPARKPLUG_REBIRTH_INTERVAL="300")
    args = ["--config", str(config(tmp_path / "ingest.toml", group))]
    try:
        with Daemon(
            database_url=database_url, mqtt_url=mqtt_url, topic=None, extra_env=env, args=args
        ) as d:
            d.wait_subscribed()
            with Publisher(mqtt_url) as pub:
                pub.publish_many(early)
                wait_until(lambda: bool(ncmd.messages()), 30, what="a Rebirth NCMD")
                _acknowledged(port, 2)
                _check_rebirth_request(group, ncmd.messages(), port)

                pub.publish_many(births(group))  # the node answers the request
                _acknowledged(port, 4)
                pub.publish_many(_session(group))
                _acknowledged(port, 7)
                _check_stored(database_url, group, online=True)
                found = scrape(port)
                assert metric(found, "ingest_sparkplug_stale_deaths_total") == 1

                pub.publish_many(_deaths(group))
                _acknowledged(port, 9)
            assert d.stop() == 0
    finally:
        ncmd.close()
    _check_stored(database_url, group, online=False)
    dead = query(database_url, "SELECT topic, reason FROM dead_letters ORDER BY id")
    assert [(r["topic"], r["reason"]) for r in dead] == [
        (topic, "unknown_alias") for topic, _ in early
    ]


def _acknowledged(port: int, count: int) -> None:
    wait_until(
        lambda: metric(scrape(port), "ingest_messages_acknowledged_total") >= count,
        60,
        what=f"{count} messages acknowledged",
    )


def _check_rebirth_request(group: str, seen: list[tuple[str, bytes]], port: int) -> None:
    """One NCMD for the node (the device's data asked the same node: rate-limited)."""
    (topic, body), *more = seen
    assert topic == f"spBv1.0/{group}/NCMD/edge1"
    (request,) = Payload.FromString(body).metrics
    assert (request.name, request.datatype, request.boolean_value) == (
        "Node Control/Rebirth",
        DataType.Boolean,
        True,
    )
    assert more == []
    found = scrape(port)
    assert metric(found, "ingest_sparkplug_rebirth_requests_total", outcome="sent") == 1
    assert metric(found, "ingest_sparkplug_rebirth_requests_total", outcome="suppressed") == 1
    assert metric(found, "ingest_dead_letters_total", reason="unknown_alias") == 2


def _session(group: str) -> list[tuple[str, bytes]]:
    """Data by alias and by name, then the will of an earlier session (bdSeq 0)."""
    stale = message(5, {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 0})
    return [
        (f"spBv1.0/{group}/NDATA/edge1", message(2, {"alias": 1, "double_value": 21.0})),
        (
            f"spBv1.0/{group}/DDATA/edge1/pump",
            message(3, {"alias": 10, "long_value": 1490}, {"name": "fw", "string_value": "1.5"}),
        ),
        (f"spBv1.0/{group}/NDEATH/edge1", stale),
    ]


def _deaths(group: str) -> list[tuple[str, bytes]]:
    return [
        (f"spBv1.0/{group}/DDEATH/edge1/pump", message(20)),
        (
            f"spBv1.0/{group}/NDEATH/edge1",
            message(30, {"name": "bdSeq", "datatype": DataType.Int64, "long_value": 1}),
        ),
    ]


def _check_stored(database_url: str, group: str, *, online: bool) -> None:
    node, pump = f"{group}/edge1", f"{group}/edge1/pump"
    rows = query(database_url, "SELECT device_id, metric, ts, value FROM readings")
    assert {tuple(r) for r in rows} == {
        (node, "bdSeq", at(0), 1.0),
        (node, "temp", at(0), 20.5),
        (node, "temp", at(2), 21.0),
        (pump, "rpm", at(1), 1500.0),
        (pump, "rpm", at(3), 1490.0),
    }
    texts = query(database_url, "SELECT device_id, metric, ts, value FROM text_readings")
    assert {tuple(r) for r in texts} == {(pump, "fw", at(1), "1.4.2"), (pump, "fw", at(3), "1.5")}
    units = query(database_url, "SELECT device_id, metric, unit FROM series WHERE unit IS NOT NULL")
    assert {tuple(r) for r in units} == {(node, "temp", "°C"), (pump, "rpm", "rpm")}
    devices = query(database_url, "SELECT device_id, status, status_at FROM devices")
    expected = (
        {(node, "online", at(0)), (pump, "online", at(1))}
        if online
        else {(node, "offline", at(30)), (pump, "offline", at(30))}
    )
    assert {tuple(r) for r in devices} == expected


def test_alias_tables_are_rebuilt_from_the_stored_births_after_a_restart(
    database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    """A daemon that starts again (another process, the births long acknowledged) decodes
    data by alias at once: the births were stored with their batch and are read back."""
    group = f"g{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = metrics_env(port)
    args = ["--config", str(config(tmp_path / "ingest.toml", group))]
    newer = message(
        50, {"name": "temp", "alias": 7, "datatype": DataType.Float, "float_value": 1.5}
    )
    # An older birth arriving after the newer one (a late redelivery) must not replace it.
    older = message(40, {"name": "count", "alias": 7, "datatype": DataType.Int32, "int_value": 1})
    with Publisher(mqtt_url) as pub:
        for run in range(2):
            with Daemon(
                database_url=database_url, mqtt_url=mqtt_url, topic=None, extra_env=env,
                args=args,
            ) as d:  # fmt: skip
                d.wait_subscribed()
                if run == 0:
                    pub.publish_many(births(group))  # the first session's births...
                    pub.publish_many([(f"spBv1.0/{group}/NBIRTH/edge2", newer)])
                    _acknowledged(port, 3)  # committed: the older one comes in another batch
                    pub.publish_many([(f"spBv1.0/{group}/NBIRTH/edge2", older)])
                    _acknowledged(port, 4)
                else:
                    d.wait_for_log("restored the alias tables of 3 Sparkplug births")
                    pub.publish_many(
                        [
                            (f"spBv1.0/{group}/DDATA/edge1/pump", message(60, {"alias": 10, "long_value": 7})),
                            (f"spBv1.0/{group}/NDATA/edge2", message(61, {"alias": 7, "float_value": 2.5})),
                        ]
                    )  # fmt: skip
                    _acknowledged(port, 2)
                    found = scrape(port)
                    assert (
                        metric(found, "ingest_sparkplug_rebirth_requests_total", outcome="sent")
                        == 0
                    )
                assert d.stop() == 0
    stored = query(database_url, "SELECT device_id, born_at FROM sparkplug_births")
    assert {tuple(r) for r in stored} == {
        (f"{group}/edge1", at(0)),
        (f"{group}/edge1/pump", at(1)),
        (f"{group}/edge2", at(50)),
    }
    rows = query(database_url, "SELECT device_id, metric, ts, value FROM readings WHERE ts >= $1", at(60))  # fmt: skip
    assert {tuple(r) for r in rows} == {
        (f"{group}/edge1/pump", "rpm", at(60), 7.0),
        (f"{group}/edge2", "temp", at(61), 2.5),
    }
    assert query(database_url, "SELECT reason FROM dead_letters") == []
