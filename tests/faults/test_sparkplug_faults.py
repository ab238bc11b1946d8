"""A Sparkplug B fleet (``simulate --format sparkplug``) under faults: the daemon killed with
SIGKILL mid-stream, and two workers sharing the subscription. Reconciled per device against
the simulator's report: every ``seq`` stored exactly once, the nodes' births, statuses."""

from __future__ import annotations

import json
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.throwaway import MosquittoFactory
from ingest.formats.sparkplug_schema import Payload
from simulators._sparkplug import alias_of
from tests.faults.harness import Fleet, Meter, Simulation, audit, counted, peak_rss_mb
from tests.integration.support import Daemon, query, scalar, wait_until

pytestmark = pytest.mark.slow

#: Numeric readings of a device's sample (seq, temperature, humidity, battery, rssi); its
#: ``fw`` is a text reading.
READINGS = 5
#: Numeric readings of an NBIRTH: bdSeq and Node Control/Rebirth.
NODE_READINGS = 2
NODE_DEVICES = 5


@pytest.fixture
def broker(mosquitto_factory: MosquittoFactory) -> Broker:
    return mosquitto_factory()


def sparkplug_daemon(
    database_url: str, broker: Broker, tmp_path: Path, group: str, meter: Meter, *args: str
) -> Daemon:
    config = tmp_path / "ingest.toml"
    config.write_text(f'[[routes]]\ntopic = "spBv1.0/{group}/#"\nformat = "sparkplug"\n')
    return Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=None,
        args=["--config", str(config), *args],
        extra_env={**meter.env, "INGEST_SPARKPLUG_REBIRTH_INTERVAL": "1"},
    )


def fleet_sim(broker: Broker, group: str, devices: int, count: int, rate: float) -> Simulation:
    # No topic: the group names the fleet's topics.
    return Simulation(
        broker.url,
        Fleet(topic="", devices=devices, count=count),
        rate=rate,
        extra=(
            "--format",
            "sparkplug",
            "--group-id",
            group,
            "--devices-per-node",
            str(NODE_DEVICES),
        ),
    )


def samples_now(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM readings WHERE metric = 'seq'") or 0)


def reconcile_fleet(url: str, report: dict[str, Any]) -> dict[str, Any]:
    """Per device, ``seq`` 1..last_seq each exactly once with its five readings and its text;
    per node, one sample per NBIRTH acknowledged; every device and node offline (deaths)."""
    per_device = report["per_device"]
    devices = {d: v["last_seq"] for d, v in per_device.items() if "last_seq" in v}
    nodes = {n: v["published"] for n, v in per_device.items() if "last_seq" not in v}
    found = query(
        url,
        "SELECT device_id, count(*) AS n, count(DISTINCT value) AS seqs,"
        " min(value) AS lo, max(value) AS hi"
        " FROM readings WHERE metric = 'seq' GROUP BY device_id",
    )
    assert {r["device_id"]: (r["n"], r["seqs"], r["lo"], r["hi"]) for r in found} == {
        d: (n, n, 1, n) for d, n in devices.items()
    }
    samples = sum(devices.values())
    rows = int(scalar(url, "SELECT count(*) FROM readings"))
    births = sum(nodes.values())
    assert rows == samples * READINGS + births * NODE_READINGS
    assert scalar(url, "SELECT count(*) FROM text_readings") == samples
    node_samples = query(
        url, "SELECT device_id, count(DISTINCT ts) AS n FROM readings WHERE metric = 'bdSeq'"
        " GROUP BY 1",
    )  # fmt: skip
    assert {r["device_id"]: r["n"] for r in node_samples} == nodes
    statuses = query(url, "SELECT device_id, status FROM devices")
    assert {r["device_id"]: r["status"] for r in statuses} == dict.fromkeys(
        [*devices, *nodes], "offline"
    )
    return {"published": report["published"], "rows": rows}


def audited(url: str, tmp_path: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``ingest audit`` with the simulator's report and the daemon's routes."""
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return audit(url, "--report", str(path), "--config", str(tmp_path / "ingest.toml"))


def all_offline(url: str, count: int) -> bool:
    return bool(scalar(url, "SELECT count(*) FROM devices WHERE status = 'offline'") == count)


def settled(url: str, devices: int, quiet: float = 3.0, timeout: float = 120.0) -> None:
    """Until every device and node is offline (the deaths came) and no sample has been stored
    for ``quiet`` seconds."""
    wait_until(partial(all_offline, url, devices), timeout, what="the deaths")
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet:
        now = samples_now(url)
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.2)


def dead_letter_seqs(url: str) -> dict[str, set[int]]:
    """The ``seq`` values held by the DDATA dead-lettered ``unknown_alias``, read with the
    simulator's alias layout (first alias table: no before_birth faults in these runs)."""
    out: dict[str, set[int]] = {}
    for r in query(url, "SELECT topic, payload FROM dead_letters WHERE reason = 'unknown_alias'"):
        _ns, group, kind, node, device = r["topic"].split("/")
        assert kind == "DDATA", r["topic"]
        position = (int(device.removeprefix("dev-")) - 1) % NODE_DEVICES
        seq_alias = alias_of(0, NODE_DEVICES, position, 0)
        for m in Payload.FromString(bytes(r["payload"])).metrics:
            if m.alias == seq_alias:
                out.setdefault(f"{group}/{node}/{device}", set()).add(int(m.long_value))
    return out


def test_sigkill_during_a_sparkplug_fleet(
    database_url: str, broker: Broker, tmp_path: Path, fault_report: list[dict[str, Any]]
) -> None:
    group = f"k{uuid.uuid4().hex[:8]}"
    meter = Meter()
    d = sparkplug_daemon(database_url, broker, tmp_path, group, meter)
    devices, count = 10, 400
    sim = fleet_sim(broker, group, devices, count, rate=40)  # 400 msg/s for 10 s
    try:
        d.start().wait_subscribed()
        sim.start()
        wait_until(lambda: samples_now(database_url) >= devices * count // 3, 120)
        meter.scrape()
        d.kill()
        d.start().wait_subscribed()
        meter.restarted()
        report = sim.report()
        t0 = time.monotonic()
        settled(database_url, devices + devices // NODE_DEVICES)
        recovery = time.monotonic() - t0
        peak = peak_rss_mb(d)
        meter.scrape()
        assert d.stop() == 0
    finally:
        sim.close()
        d.close()
    dead = query(database_url, "SELECT reason, count(*) AS n FROM dead_letters GROUP BY 1")
    figures = {
        "published": report["published"],
        "rows": int(scalar(database_url, "SELECT count(*) FROM readings")),
        "dead_letters": sum(r["n"] for r in dead),
        **counted(meter),
    }
    fault_report.append(
        {
            "fault": "SIGKILL, Sparkplug fleet ("
            + (", ".join(f"{r['reason']} {r['n']}" for r in dead) or "no dead letters")
            + ")",
            **figures,
            "recovery_s": round(recovery, 1),
            "peak_rss_mb": peak,
        }
    )
    # Nothing stored twice, and nothing vanished: a sample not stored is in a dead letter.
    stored = query(
        database_url,
        "SELECT device_id, array_agg(value::bigint) AS seqs FROM readings WHERE metric = 'seq'"
        " GROUP BY 1",
    )
    held = dead_letter_seqs(database_url)
    missing: dict[str, list[int]] = {}
    for r in stored:
        seqs = list(r["seqs"])
        assert len(seqs) == len(set(seqs)), r["device_id"]
        last = report["per_device"][r["device_id"]]["last_seq"]
        gone = sorted(set(range(1, last + 1)) - set(seqs))
        assert set(gone) <= held.get(r["device_id"], set()), (r["device_id"], gone)
        if gone:
            missing[r["device_id"]] = gone
    # The births are stored with their batch and the alias tables rebuilt from them at start:
    # what the broker redelivers or queued for the restarted daemon decodes at once.
    assert not missing, f"samples only in unknown_alias dead letters: {missing}"
    assert figures["dead_letters"] == 0, dead
    reconcile_fleet(database_url, report)
    # The operator's audit agrees, device by device and node by node, with the report.
    verdict = audited(database_url, tmp_path, report)["verdict"]
    assert verdict["ok"], verdict


def test_two_workers_ingest_a_sparkplug_fleet_exactly(
    database_url: str, broker: Broker, tmp_path: Path, fault_report: list[dict[str, Any]]
) -> None:
    group = f"w{uuid.uuid4().hex[:8]}"
    meter = Meter()
    d = sparkplug_daemon(database_url, broker, tmp_path, group, meter, "--workers", "2")
    devices, count = 20, 150
    sim = fleet_sim(broker, group, devices, count, rate=20)  # 400 msg/s for 7.5 s
    try:
        d.start()
        wait_until(lambda: d.log_text().count("subscribed to") >= 2, 60, what="two workers")
        sim.start()
        report = sim.report()
        expected = sum(v.get("last_seq", 0) for v in report["per_device"].values())
        wait_until(lambda: samples_now(database_url) >= expected, 120, what="every sample")
        wait_until(partial(all_offline, database_url, devices + 4), 60, what="the deaths")
        meter.scrape()
        assert d.stop() == 0
    finally:
        sim.close()
        d.close()
    figures = {**reconcile_fleet(database_url, report), **counted(meter)}
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    # Both workers took data (the shared subscription), and both learned every birth.
    received = [run.get("ingest_messages_received_total", 0) for run in meter.runs]
    assert sum(received) >= report["published"], received
    verdict = audited(database_url, tmp_path, report)["verdict"]
    assert verdict["ok"], verdict
    fault_report.append(
        {"fault": "2 workers, Sparkplug fleet", **figures, "dead_letters": 0, "recovery_s": ""}
    )
