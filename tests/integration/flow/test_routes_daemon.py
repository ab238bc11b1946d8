"""Several routes in one daemon: a JSON fleet, a value-per-topic fleet, a Kepware-style
gateway and Shelly-style rest-of-topic metrics at once, from one config file."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ingest.devservers import free_port
from tests.integration.observability.test_observability import metric, metrics_env, scrape
from tests.integration.support import Daemon, Publisher, query, scalar, wait_until

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def config(path: Path, p: str) -> Path:
    path.write_text(
        f"""
[[routes]]
topic = "{p}/json/{{device_id}}/telemetry"

[[routes]]
topic = "{p}/stat/{{site}}/{{device_id}}/{{metric}}"
format = "value"
tags = {{ source = "tasmota" }}

[[routes]]
topic = "{p}/gw/{{device_id}}"
tags = {{ source = "kepware" }}
[routes.json]
ts = "timestamp"
samples = "values"
sample_name = "id"
sample_value = "v"
sample_ts = "t"

[[routes]]
topic = "{p}/shellies/{{device_id}}/{{metric...}}"
format = "value"
"""
    )
    return path


def messages(p: str) -> list[tuple[str, bytes]]:
    json_fleet = [
        (
            f"{p}/json/j{d}/telemetry",
            json.dumps({"ts": T0 + seq, "seq": seq, "t": 20.5 + d, "fw": "1.0"}).encode(),
        )
        for seq in range(3)
        for d in (1, 2)
    ]
    values = [
        (f"{p}/stat/north/plug1/POWER", b'{"ts": %d, "value": 42.5}' % T0),
        (f"{p}/stat/north/plug1/RELAY", b'{"ts": %d, "value": "ON"}' % T0),
        (f"{p}/stat/south/plug2/STATE", b'{"ts": %d, "value": "idle"}' % T0),
    ]
    gateway = [
        (
            f"{p}/gw/plc1",
            json.dumps(
                {
                    "timestamp": (T0 + 10) * 1000,
                    "values": [
                        {"id": "Line1.Temp", "v": 71.25, "q": True, "t": (T0 + 11) * 1000},
                        {"id": "Line1.Run", "v": True, "q": True},
                        {"id": "Line1.Mode", "v": "AUTO", "q": True},
                    ],
                }
            ).encode(),
        )
    ]
    shelly = [(f"{p}/shellies/sh1/relay/0/energy", b'{"ts": %d, "value": 1234}' % T0)]
    return json_fleet + values + gateway + shelly


BAD = [
    ("stat/north/plug1/POWER", b"\xff\xfe", "invalid_utf8"),
    ("gw/plc1", b'{"values": [{"v": 1}]}', "bad_sample"),
    ("shellies/sh1", b"1", "bad_topic"),  # the filter's # takes the parent level, the template not
]


def test_mixed_fleet_one_daemon(database_url: str, mqtt_url: str, tmp_path: Path) -> None:
    p = f"r{uuid.uuid4().hex[:8]}"
    port = free_port()
    good = messages(p)
    bad = [(f"{p}/{topic}", payload) for topic, payload, _ in BAD]
    with Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=None,  # the routes table is the config
        extra_env=metrics_env(port),
        args=["--config", str(config(tmp_path / "ingest.toml", p))],
    ) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many([*good, *bad])
        total = len(good) + len(bad)
        wait_until(
            lambda: metric(scrape(port), "ingest_messages_acknowledged_total") >= total,
            30,
            what="every message acknowledged",
        )
        found = scrape(port)
        assert metric(found, "ingest_messages_received_total") == total
        assert metric(found, "ingest_messages_acknowledged_total") == total
        assert d.stop() == 0
    rows = query(
        database_url,
        "SELECT device_id, metric, ts, value FROM readings",
    )
    got = {(r["device_id"], r["metric"], r["ts"], r["value"]) for r in rows}
    expected = {
        (f"j{d}", m, at(T0 + seq), v)
        for d in (1, 2)
        for seq in range(3)
        for m, v in (("seq", float(seq)), ("t", 20.5 + d))
    } | {
        ("plug1", "POWER", at(T0), 42.5),
        ("plug1", "RELAY", at(T0), 1.0),
        ("plc1", "Line1.Temp", at(T0 + 11), 71.25),
        ("plc1", "Line1.Run", at(T0 + 10), 1.0),
        ("sh1", "relay.0.energy", at(T0), 1234.0),
    }
    assert got == expected
    dead = query(database_url, "SELECT topic, payload, reason FROM dead_letters ORDER BY id")
    assert sorted((r["topic"], bytes(r["payload"]), r["reason"]) for r in dead) == sorted(
        (f"{p}/{t}", payload, reason) for t, payload, reason in BAD
    )
    _check_texts_and_tags(database_url)


def _check_texts_and_tags(database_url: str) -> None:
    texts = query(database_url, "SELECT device_id, metric, ts, value FROM text_readings")
    assert {tuple(r) for r in texts} == {("j1", "fw", at(T0 + s), "1.0") for s in range(3)} | {
        ("j2", "fw", at(T0 + s), "1.0") for s in range(3)
    } | {
        ("plug2", "STATE", at(T0), "idle"),
        ("plc1", "Line1.Mode", at(T0 + 10), "AUTO"),
    }
    records = query(database_url, "SELECT device_id, tags FROM devices WHERE tags <> '{}'")
    tags = {r["device_id"]: r["tags"] for r in records}
    assert _as_dict(tags["plug1"]) == {"source": "tasmota", "site": "north"}
    assert _as_dict(tags["plug2"]) == {"source": "tasmota", "site": "south"}
    assert _as_dict(tags["plc1"]) == {"source": "kepware"}


def _as_dict(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


def test_overlapping_filters_count_duplicates(
    database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    # Two routes whose filters both match p/ov/d1/telemetry: the broker may deliver it once
    # per subscription; the first route decodes every copy and the key absorbs the extra ones.
    p = f"o{uuid.uuid4().hex[:8]}"
    port = free_port()
    path = tmp_path / "ingest.toml"
    path.write_text(
        f'[[routes]]\ntopic = "{p}/ov/{{device_id}}/telemetry"\n\n'
        f'[[routes]]\ntopic = "{p}/ov/{{device_id}}/{{metric}}"\nformat = "value"\n'
    )
    items = [
        (f"{p}/ov/d1/telemetry", b'{"ts": %d, "a": %d, "b": 1}' % (T0 + i, i)) for i in range(5)
    ]
    items.append((f"{p}/ov/d1/temp", b"21.5"))
    with Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=None,
        extra_env=metrics_env(port),
        args=["--config", str(path)],
    ) as d:
        d.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many(items)
        wait_until(lambda: scalar(database_url, "SELECT count(*) FROM readings") == 11, 30)
        wait_until(
            lambda: (
                metric(scrape(port), "ingest_messages_acknowledged_total")
                == metric(scrape(port), "ingest_messages_received_total")
                >= len(items)
            ),
            30,
            what="every copy acknowledged",
        )
        found = scrape(port)
        copies = metric(found, "ingest_messages_received_total") - len(items)
        assert 0 <= copies <= 5  # only the telemetry topic matches both filters
        assert metric(found, "ingest_readings_duplicates_total") == copies * 2
        assert metric(found, "ingest_readings_written_total") == 11
        assert d.stop() == 0
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
