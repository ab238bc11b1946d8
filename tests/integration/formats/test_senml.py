"""The ``senml`` format end to end: the simulator's SenML fleets (JSON packs on a route naming
the device, CBOR packs on a wildcard route where the pack names it) through the daemon into
readings, text readings, series units and device tags, reconciled by ``ingest audit``.

The expected values are not read back from the simulator's pack builder: each device's
signals are replayed (same seed, same device index) at the times the database holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from simulators._signals import Signals
from tests.integration.support import Daemon, Publisher, audit_reconciled, query, scalar, wait_until

SEED = 11
ROUTES = """
[[routes]]
topic = "{p}/json/{{device_id}}"
format = "senml"
tags = {{ source = "sim" }}

[[routes]]
topic = "{p}/cbor/#"
format = "senml"
"""
UNITS = {"temperature": "Cel", "humidity": "%RH", "battery": "V", "seq": None, "rssi": None}


def _simulate(mqtt_url: str, *args: str) -> dict[str, Any]:
    sim = subprocess.run(
        [sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url, "--rate", "50",
         "--seed", str(SEED), "--report", "json", "--quiet", "--format", "senml", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    report: dict[str, Any] = json.loads(sim.stdout)
    assert report["failed"] == 0
    return report


def _expected_rows(database_url: str, device_id: str, index: int) -> list[tuple[Any, ...]]:
    """The device's readings as its signals give them, at the times its seq rows have."""
    seq_rows = query(
        database_url,
        "SELECT ts, value FROM readings WHERE device_id = $1 AND metric = 'seq' ORDER BY value",
        device_id,
    )
    signals = Signals(SEED, index)
    rows: list[tuple[Any, ...]] = []
    for row in seq_rows:
        ts: datetime = row["ts"]
        ms = round(ts.timestamp() * 1000)
        t, h, b, r = signals.step(ms)
        rows += [(ts, "seq", row["value"]), (ts, "temperature", t), (ts, "humidity", h)]
        rows += [(ts, "battery", b), (ts, "rssi", r)]
    return sorted(rows)


def _stored_rows(database_url: str, device_id: str) -> list[tuple[Any, ...]]:
    rows = query(
        database_url, "SELECT ts, metric, value FROM readings WHERE device_id = $1", device_id
    )
    return sorted((r["ts"], r["metric"], r["value"]) for r in rows)


def test_senml_fleets_json_and_cbor(database_url: str, mqtt_url: str, tmp_path: Path) -> None:
    p = f"s{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ingest.toml"
    config.write_text(ROUTES.format(p=p))
    daemon = Daemon(
        database_url=database_url, mqtt_url=mqtt_url, topic=None, args=["--config", str(config)]
    )
    with daemon:
        daemon.wait_subscribed()
        by_topic = _simulate(
            mqtt_url, "--topic", f"{p}/json/{{device_id}}", "--devices", "3", "--count", "10",
            "--samples-per-message", "2", "--duplicate-ratio", "0.2", "--late-ratio", "0.1",
        )  # fmt: skip
        by_pack = _simulate(
            mqtt_url, "--senml-cbor", "--topic", f"{p}/cbor/{{device_id}}", "--first-device",
            "101", "--devices", "2", "--count", "15",
        )  # fmt: skip
        audit_json = audit_reconciled(
            database_url, config, by_topic, devices=list(by_topic["per_device"]), timeout=90
        )
        audit_cbor = audit_reconciled(
            database_url, config, by_pack, devices=list(by_pack["per_device"]), timeout=90
        )
        assert daemon.stop() == 0

    assert by_topic["samples"] == 60 and by_pack["samples"] == 30
    assert audit_json["totals"]["samples"] == 60 and audit_cbor["totals"]["samples"] == 30
    assert audit_json["totals"]["rows"] == 60 * 5 and audit_cbor["totals"]["rows"] == 30 * 5
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    # (device, its index in its fleet, samples it sent)
    fleets = [("dev-00001", 0, 20), ("dev-00002", 1, 20), ("dev-00003", 2, 20)]
    fleets += [("dev-00101", 0, 15), ("dev-00102", 1, 15)]
    for device_id, index, _ in fleets:
        assert _stored_rows(database_url, device_id) == _expected_rows(
            database_url, device_id, index
        ), device_id
    assert scalar(database_url, "SELECT count(*) FROM readings") == 90 * 5

    # The firmware version is a vs record: one text reading per sample.
    texts = query(
        database_url,
        "SELECT device_id, count(*) AS n, min(value) AS fw, max(value) AS last"
        " FROM text_readings WHERE metric = 'fw' GROUP BY device_id ORDER BY device_id",
    )
    assert [(r["device_id"], r["n"], r["fw"], r["last"]) for r in texts] == [
        (device_id, samples, Signals(SEED, index).fw, Signals(SEED, index).fw)
        for device_id, index, samples in fleets
    ]
    assert scalar(database_url, "SELECT count(*) FROM text_readings") == 90

    units = query(database_url, "SELECT device_id, metric, unit FROM series WHERE metric <> 'fw'")
    assert {(r["device_id"], r["metric"], r["unit"]) for r in units} == {
        (device_id, metric, unit) for device_id, *_ in fleets for metric, unit in UNITS.items()
    }
    tags = query(database_url, "SELECT device_id, tags FROM devices ORDER BY device_id")
    assert {r["device_id"]: _json(r["tags"]) for r in tags} == {
        "dev-00001": {"source": "sim"},
        "dev-00002": {"source": "sim"},
        "dev-00003": {"source": "sim"},
        "dev-00101": {},
        "dev-00102": {},
    }


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def test_rfc_example_pack_through_the_daemon(database_url: str, mqtt_url: str) -> None:
    """RFC 8428's multiple-data-types example, published as a device would, on both kinds of
    route: the device from the topic, and from the pack's base name."""
    p = f"s{uuid.uuid4().hex[:8]}"
    routes = [
        {"topic": f"{p}/by-topic/{{device_id}}", "format": "senml"},
        {"topic": f"{p}/by-pack/+", "format": "senml"},
    ]
    pack = (
        b'[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},'
        b'{"n":"label","vs":"Machine Room"},{"n":"open","vb":false},'
        b'{"n":"nfc-reader","vd":"aGkgCg"}]'
    )
    daemon = Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=None,
        extra_env={"INGEST_ROUTES": json.dumps(routes)},
    )
    with daemon:
        daemon.wait_subscribed()
        with Publisher(mqtt_url) as pub:
            pub.publish_many([(f"{p}/by-topic/boiler-1", pack), (f"{p}/by-pack/x", pack)])
        wait_until(
            lambda: scalar(database_url, "SELECT count(*) FROM text_readings") == 2,
            timeout=60,
            what="both packs",
        )
        assert daemon.stop() == 0
    rows = query(database_url, "SELECT device_id, metric, value FROM readings ORDER BY 1, 2")
    urn = "urn:dev:ow:10e2073a01080063"
    assert [tuple(r) for r in rows] == [
        ("boiler-1", "open", 0.0),
        ("boiler-1", "temp", 23.1),
        (urn, "open", 0.0),
        (urn, "temp", 23.1),
    ]
    texts = query(database_url, "SELECT device_id, metric, value FROM text_readings ORDER BY 1")
    assert [tuple(r) for r in texts] == [
        ("boiler-1", "label", "Machine Room"),
        (urn, "label", "Machine Room"),
    ]
    units = query(database_url, "SELECT device_id, metric, unit FROM series ORDER BY 1, 2")
    assert [tuple(r) for r in units] == [
        ("boiler-1", "label", None),
        ("boiler-1", "open", None),
        ("boiler-1", "temp", "Cel"),
        (urn, "label", None),
        (urn, "open", None),
        (urn, "temp", "Cel"),
    ]
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    received = scalar(database_url, "SELECT max(ts) FROM readings")
    assert abs((datetime.now(UTC) - received).total_seconds()) < 600  # no t: the receive time
