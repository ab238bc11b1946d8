"""``ingest run`` with several brokers: a worker set per broker, one database, every message
stored exactly once; one broker stopped and restarted loses nothing while the other's flow
carries on, and ``/readyz`` names the broker that is down meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from ingest.devservers import free_port
from ingest.devservers.throwaway import MosquittoFactory
from ingest.urls import broker_name
from tests.integration.support import Daemon, query, unique_topic, wait_rows, wait_until

READINGS = 5  # per simulator sample: seq, temperature, humidity, battery, rssi


def simulate(urls: list[str], topic: str, *, devices: int, count: int, first: int) -> Any:
    """``simulate`` over ``urls`` (devices dev-<first>...): its JSON report, all acknowledged."""
    args = [sys.executable, "-m", "simulators", "--topic", topic, "--qos", "1"]
    for url in urls:
        args += ["--mqtt-url", url]
    args += ["--devices", str(devices), "--count", str(count), "--rate", "1000000"]
    args += ["--first-device", str(first), "--report", "json", "--quiet"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["failed"] == 0 and report["published"] == devices * count, report
    return report


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    return status, json.loads(body)


def received_by_broker(port: int) -> dict[str, float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("ingest_messages_received_total{"):
            labels = line[line.index("{") + 1 : line.index("}")]
            broker = dict(p.split("=", 1) for p in labels.split(","))["broker"].strip('"')
            out[broker] = out.get(broker, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def seqs_stored(database_url: str, first: int, devices: int) -> dict[str, tuple[int, int]]:
    """Per device of dev-<first>..: (seq rows, distinct seq values)."""
    rows = query(
        database_url,
        "SELECT device_id, count(*) AS n, count(DISTINCT value) AS d FROM readings"
        " WHERE metric = 'seq' AND device_id = ANY($1) GROUP BY device_id",
        [f"dev-{i:05d}" for i in range(first, first + devices)],
    )
    return {r["device_id"]: (r["n"], r["d"]) for r in rows}


def exactly_once(database_url: str, report: Any, first: int) -> None:
    """Every sample the simulator had acknowledged is stored once: seq 1..N per device."""
    expected = {dev: (f["last_seq"],) * 2 for dev, f in report["per_device"].items()}
    assert seqs_stored(database_url, first, report["devices"]) == expected


def test_two_brokers_every_message_once_and_one_broker_down(
    database_url: str, mosquitto_factory: MosquittoFactory
) -> None:
    a, b = mosquitto_factory(), mosquitto_factory()
    if not b.persistent:
        pytest.skip("stopping a broker and keeping its queue needs mosquitto")
    name_a, name_b = broker_name(a.url), broker_name(b.url)
    topic = unique_topic()
    port = free_port()
    d = Daemon(
        database_url=database_url,
        mqtt_url=f"{a.url},{b.url}",
        topic=topic,
        extra_env={"INGEST_METRICS_PORT": str(port), "INGEST_READY_MAX_LAG": "120"},
    )
    try:
        d.start()
        wait_until(lambda: d.log_text().count("subscribed to $share/") >= 2, 90)
        for client_id in (f"{d.client_id}-b0-0", f"{d.client_id}-b1-0"):
            assert f"client id {client_id}" in d.log_text()

        # One fleet over both brokers: device i to broker i mod 2.
        spread = simulate([a.url, b.url], topic, devices=10, count=100, first=1)
        assert {k: v["published"] for k, v in spread["brokers"].items()} == {
            name_a: 500,
            name_b: 500,
        }
        wait_rows(database_url, 1000 * READINGS, timeout=120)
        assert received_by_broker(port) == {name_a: 500.0, name_b: 500.0}
        wait_until(lambda: readyz(port)[0] == 200, 60, what="ready")
        _, body = readyz(port)
        assert body["ready"] is True and set(body["brokers"]) == {name_a, name_b}
        assert set(body["brokers"][name_b]["workers"]) == {"b1-0"}

        # A backlog on broker B, which stops while the daemon drains it (here about half of
        # it was still queued at B when it stopped)...
        backlog = simulate([b.url], topic, devices=10, count=1000, first=11)
        b.stop()
        status, body = 0, {}

        def names_b_down() -> bool:
            nonlocal status, body
            status, body = readyz(port)
            brokers = body.get("brokers", {})
            return status == 503 and brokers[name_b]["ready"] is False and brokers[name_a]["ready"]

        wait_until(names_b_down, 60, what="/readyz naming the broker that is down")
        assert body["ready"] is False
        assert "not subscribed" in json.dumps(body["brokers"][name_b]["workers"])

        # ...while broker A's flow carries on.
        carried = simulate([a.url], topic, devices=10, count=100, first=21)
        wait_until(
            lambda: (
                seqs_stored(database_url, 21, 10)
                == {f"dev-{i:05d}": (100, 100) for i in range(21, 31)}
            ),
            120,
            what="broker A's messages stored while broker B is down",
        )
        assert readyz(port)[1]["brokers"][name_b]["ready"] is False

        # B back: what it kept in the daemon's session is delivered; nothing lost.
        b.start()
        wait_rows(database_url, (1000 + 10_000 + 1000) * READINGS, timeout=240)
        wait_until(lambda: readyz(port)[0] == 200, 90, what="ready again")
        assert d.stop(timeout=60) == 0
    finally:
        d.close()
    for report, first in ((spread, 1), (backlog, 11), (carried, 21)):
        exactly_once(database_url, report, first)
