"""README "Recipes": each route table, read from the README itself, takes real-looking payloads
of its device family through the route table and the decoder, and through the daemon.

Topics get a unique prefix (tests share one broker); everything else is the README's table.
Readings are checked in the database; text readings and tags at the decoder, and in the
database too (``text_readings``, ``devices.tags``).
"""

from __future__ import annotations

import json
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.formats.decode import FORMATS, decode
from ingest.formats.routes import parse_routes
from ingest.model import Decoded
from tests.integration.support import Daemon, Publisher, query, scalar, wait_until

README = Path(__file__).resolve().parents[3] / "README.md"
RECEIVED = datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC)
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ANY = None  # a reading without its own time: the receive time


def recipe(name: str) -> list[dict[str, Any]]:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- recipe: {name} -->\n```toml\n(.*?)```", text, re.S)
    assert found, f"README has no recipe {name}"
    routes: list[dict[str, Any]] = tomllib.loads(found.group(1))["routes"]
    return routes


@dataclass
class Case:
    messages: list[tuple[str, bytes]]
    readings: set[tuple[str, str, datetime | None, float]]
    texts: set[tuple[str, str, datetime | None, str]] = field(default_factory=set)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "tasmota": Case(
        messages=[
            (
                "tele/plug1/SENSOR",
                b'{"Time":"2024-05-01T12:00:00","ENERGY":{"TotalStartTime":"2024-01-01T00:00:00",'
                b'"Total":1.25,"Power":42,"Voltage":229},"AM2301":{"Temperature":21.5},'
                b'"TempUnit":"C"}',
            ),
            (
                "tele/plug1/STATE",
                b'{"Time":"2024-05-01T12:00:00","Uptime":"0T01:02:03","UptimeSec":3723,'
                b'"POWER":"ON","Wifi":{"RSSI":76,"Signal":-62}}',
            ),
            ("stat/plug1/POWER", b"ON"),
            ("stat/plug1/RESULT", b'{"POWER":"OFF"}'),
        ],
        readings={
            ("plug1", "ENERGY.Total", NOON, 1.25),
            ("plug1", "ENERGY.Power", NOON, 42.0),
            ("plug1", "ENERGY.Voltage", NOON, 229.0),
            ("plug1", "AM2301.Temperature", NOON, 21.5),
            ("plug1", "UptimeSec", NOON, 3723.0),
            ("plug1", "Wifi.RSSI", NOON, 76.0),
            ("plug1", "Wifi.Signal", NOON, -62.0),
            ("plug1", "POWER", ANY, 1.0),
        },
        texts={
            ("plug1", "ENERGY.TotalStartTime", NOON, "2024-01-01T00:00:00"),
            ("plug1", "TempUnit", NOON, "C"),
            ("plug1", "Uptime", NOON, "0T01:02:03"),
            ("plug1", "POWER", NOON, "ON"),
            ("plug1", "POWER", ANY, "OFF"),
        },
        tags={"plug1": {"source": "tasmota"}},
    ),
    "shelly": Case(
        messages=[
            (
                "shellies/shelly1pm-A1B2C3/announce",
                b'{"id":"shelly1pm-A1B2C3","model":"SHSW-PM","mac":"A1B2C3D4E5F6",'
                b'"ip":"192.168.1.40","new_fw":false,"fw_ver":"20230913-112003/v1.14.0-gcb84623"}',
            ),
            ("shellies/shelly1pm-A1B2C3/relay/0", b"on"),
            ("shellies/shelly1pm-A1B2C3/relay/0/power", b"42.1"),
            ("shellies/shelly1pm-A1B2C3/relay/0/energy", b"1234"),
            ("shellies/shelly1pm-A1B2C3/temperature", b"45.3"),
            ("shellies/shelly1pm-A1B2C3/online", b"true"),
        ],
        readings={
            ("shelly1pm-A1B2C3", "new_fw", ANY, 0.0),
            ("shelly1pm-A1B2C3", "relay.0", ANY, 1.0),
            ("shelly1pm-A1B2C3", "relay.0.power", ANY, 42.1),
            ("shelly1pm-A1B2C3", "relay.0.energy", ANY, 1234.0),
            ("shelly1pm-A1B2C3", "temperature", ANY, 45.3),
            ("shelly1pm-A1B2C3", "online", ANY, 1.0),
        },
        texts={("shelly1pm-A1B2C3", "id", ANY, "shelly1pm-A1B2C3")},
        tags={
            "shelly1pm-A1B2C3": {
                "source": "shelly",
                "model": "SHSW-PM",
                "mac": "A1B2C3D4E5F6",
                "ip": "192.168.1.40",
                "fw_ver": "20230913-112003/v1.14.0-gcb84623",
            }
        },
    ),
    "zigbee2mqtt": Case(
        messages=[
            (
                "zigbee2mqtt/hall_sensor",
                b'{"temperature":21.5,"humidity":40.1,"battery":97,"linkquality":120,'
                b'"contact":true,"state":"ON","update":{"state":"idle"}}',
            ),
        ],
        readings={
            ("hall_sensor", "temperature", ANY, 21.5),
            ("hall_sensor", "humidity", ANY, 40.1),
            ("hall_sensor", "battery", ANY, 97.0),
            ("hall_sensor", "linkquality", ANY, 120.0),
            ("hall_sensor", "contact", ANY, 1.0),
        },
        texts={
            ("hall_sensor", "state", ANY, "ON"),
            ("hall_sensor", "update.state", ANY, "idle"),
        },
        tags={"hall_sensor": {"source": "zigbee2mqtt"}},
    ),
    "esphome": Case(
        messages=[
            ("esphome/livingroom/sensor/temperature/state", b"21.5"),
            ("esphome/livingroom/binary_sensor/motion/state", b"ON"),
            ("esphome/livingroom/text_sensor/wifi_ssid/state", b"home-net"),
            ("homeassistant/sensor/kitchen_temp/state", b"22.5"),
            ("homeassistant/sensor/kitchen_temp/unit_of_measurement", '"°C"'.encode()),
            ("homeassistant/light/porch/state", b"off"),
        ],
        readings={
            ("livingroom", "temperature", ANY, 21.5),
            ("livingroom", "motion", ANY, 1.0),
            ("kitchen_temp", "state", ANY, 22.5),
            ("porch", "state", ANY, 0.0),
        },
        texts={
            ("livingroom", "wifi_ssid", ANY, "home-net"),
            ("kitchen_temp", "unit_of_measurement", ANY, "°C"),
        },
        tags={
            "livingroom": {"source": "esphome"},
            "kitchen_temp": {"source": "home-assistant", "domain": "sensor"},
            "porch": {"source": "home-assistant", "domain": "light"},
        },
    ),
    "kepware": Case(
        messages=[
            (
                "kepware/plant1",
                b'{"timestamp":1714564800000,"values":['
                b'{"id":"Line1.Temp","v":71.25,"q":true,"t":1714564801000},'
                b'{"id":"Line1.Run","v":true,"q":true,"t":1714564801000},'
                b'{"id":"Line1.Count","v":1200,"q":false},'
                b'{"id":"Line1.Mode","v":"AUTO","q":true}]}',
            ),
        ],
        readings={
            ("plant1", "Line1.Temp", datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC), 71.25),
            ("plant1", "Line1.Run", datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC), 1.0),
            ("plant1", "Line1.Count", NOON, 1200.0),
        },
        texts={("plant1", "Line1.Mode", NOON, "AUTO")},
        tags={"plant1": {"source": "kepware"}},
    ),
}


def prefixed(routes: list[dict[str, Any]], p: str) -> list[dict[str, Any]]:
    return [{**r, "topic": f"{p}/{r['topic']}"} for r in routes]


def same(got: set[tuple[Any, ...]], expected: set[tuple[Any, ...]]) -> bool:
    """``expected`` with ``ANY`` for a time matches ``got`` at any time."""
    loose = {(d, m, v) for d, m, ts, v in expected if ts is ANY}
    strict = {e for e in expected if e[2] is not ANY}
    got_strict = {g for g in got if (g[0], g[1], g[3]) not in loose}
    got_loose = {(g[0], g[1], g[3]) for g in got if (g[0], g[1], g[3]) in loose}
    return got_strict == strict and got_loose == loose and len(got) == len(expected)


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_at_the_decoder(name: str) -> None:
    case = CASES[name]
    table = parse_routes(prefixed(recipe(name), "p"), FORMATS)
    readings: set[tuple[Any, ...]] = set()
    texts: set[tuple[Any, ...]] = set()
    tags: dict[str, dict[str, str]] = {}
    for topic, payload in case.messages:
        result = decode(f"p/{topic}", payload, RECEIVED, table)
        assert isinstance(result, Decoded), (topic, result)
        readings |= {tuple(r) for r in result.readings}
        texts |= {tuple(t) for t in result.texts}
        for update in result.updates:
            tags.setdefault(update.device_id, {}).update(update.tags or {})
    assert same(readings, case.readings), sorted(readings)
    assert same(texts, case.texts), sorted(texts)
    assert tags == case.tags


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_through_the_daemon(name: str, database_url: str, mqtt_url: str) -> None:
    case = CASES[name]
    p = f"rc{uuid.uuid4().hex[:8]}"
    routes = json.dumps(prefixed(recipe(name), p))
    with Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=None,
        extra_env={"INGEST_ROUTES": routes},
    ) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many([(f"{p}/{topic}", payload) for topic, payload in case.messages])
        count = "SELECT count(*) FROM readings"
        wait_until(lambda: scalar(database_url, count) == len(case.readings), 30)
        assert d.stop() == 0
    rows = query(database_url, "SELECT device_id, metric, ts, value FROM readings")
    assert same({tuple(r) for r in rows}, case.readings), sorted(tuple(r) for r in rows)
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    texts = query(database_url, "SELECT device_id, metric, ts, value FROM text_readings")
    assert same({tuple(r) for r in texts}, case.texts)
    stored = query(database_url, "SELECT device_id, tags FROM devices WHERE tags <> '{}'")
    assert {
        r["device_id"]: json.loads(r["tags"]) if isinstance(r["tags"], str) else dict(r["tags"])
        for r in stored
    } == case.tags
