"""The simulator's ``--format value`` and ``--tags`` through a daemon with routes, reconciled
by ``ingest audit`` with the same route table."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.integration.support import Daemon, audit_reconciled, query, scalar

ROUTES = """
[[routes]]
topic = "{p}/f/{{site}}/{{line}}/{{device_id}}/telemetry"
tags = {{ source = "sim" }}

[[routes]]
topic = "{p}/v/{{device_id}}/{{metric}}"
format = "value"
"""


def _simulate(mqtt_url: str, *args: str) -> dict[str, Any]:
    sim = subprocess.run(
        [sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url, "--rate", "50",
         "--seed", "11", "--report", "json", "--quiet", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    report: dict[str, Any] = json.loads(sim.stdout)
    return report


def _daemon(database_url: str, mqtt_url: str, config: Path) -> Daemon:
    return Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=None,
        args=["--config", str(config)],
    )


def test_value_fleet_reconciles(database_url: str, mqtt_url: str, tmp_path: Path) -> None:
    p = f"s{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ingest.toml"
    config.write_text(ROUTES.format(p=p))
    with _daemon(database_url, mqtt_url, config) as daemon:
        daemon.wait_subscribed()
        report = _simulate(
            mqtt_url, "--format", "value", "--topic", f"{p}/v/{{device_id}}/{{metric}}",
            "--devices", "3", "--count", "20", "--duplicate-ratio", "0.1", "--late-ratio", "0.1",
        )  # fmt: skip
        result = audit_reconciled(database_url, config, report)
        assert daemon.stop() == 0
    assert report["samples"] == 60
    # Six topics per sample (seq, four numbers, the firmware text), each published.
    assert report["published"] == 6 * (60 + report["faults"]["duplicate"])
    assert result["totals"]["samples"] == 60
    assert result["totals"]["rows"] == 60 * 5
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0
    metrics = {r["metric"] for r in query(database_url, "SELECT DISTINCT metric FROM readings")}
    assert metrics == {"seq", "temperature", "humidity", "battery", "rssi"}


def test_tagged_fleet_spreads_over_the_combinations(
    database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    p = f"s{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ingest.toml"
    config.write_text(ROUTES.format(p=p))
    with _daemon(database_url, mqtt_url, config) as daemon:
        daemon.wait_subscribed()
        report = _simulate(
            mqtt_url, "--topic", f"{p}/f/{{site}}/{{line}}/{{device_id}}/telemetry",
            "--tags", "site=north,south", "line=1,2", "--devices", "4", "--count", "10",
        )  # fmt: skip
        result = audit_reconciled(database_url, config, report)
        assert daemon.stop() == 0
    assert result["totals"]["samples"] == 40
    assert result["totals"]["rows"] == 40 * 5
    rows = query(database_url, "SELECT device_id, tags FROM devices ORDER BY device_id")
    tags = [json.loads(r["tags"]) if isinstance(r["tags"], str) else dict(r["tags"]) for r in rows]
    assert [(t["site"], t["line"]) for t in tags] == [
        ("north", "1"),
        ("north", "2"),
        ("south", "1"),
        ("south", "2"),
    ]
    assert all(t["source"] == "sim" for t in tags)
