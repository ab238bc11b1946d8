"""kill -9 under load with two routes in one daemon (a JSON fleet and a value-per-topic
fleet at once): nothing lost, nothing stored twice."""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.throwaway import MosquittoFactory
from tests.faults.harness import READINGS, Fleet, Meter, Simulation, counted, reconcile, rows_now
from tests.integration.support import Daemon, wait_rows, wait_until

pytestmark = pytest.mark.slow

VALUE_PARTS = 6  # seq, temperature, humidity, battery, rssi, fw: one topic each


@pytest.fixture
def broker(mosquitto_factory: MosquittoFactory) -> Broker:
    return mosquitto_factory()


def _merged(*reports: dict[str, Any]) -> dict[str, Any]:
    """The reports of fleets with distinct device ids, as one."""
    return {
        "per_device": {k: v for r in reports for k, v in r["per_device"].items()},
        "samples": sum(r["samples"] for r in reports),
        "published": sum(r["published"] for r in reports),
    }


def test_sigkill_with_two_routes(
    database_url: str, broker: Broker, tmp_path: Path, fault_report: list[dict[str, Any]]
) -> None:
    p = f"k{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ingest.toml"
    config.write_text(
        f'[[routes]]\ntopic = "{p}/j/{{device_id}}/telemetry"\n\n'
        f'[[routes]]\ntopic = "{p}/v/{{device_id}}/{{metric}}"\nformat = "value"\n'
    )
    json_fleet = Fleet(topic=f"{p}/j/{{device_id}}/telemetry", devices=10, count=1500)
    value_fleet = Fleet(topic=f"{p}/v/{{device_id}}/{{metric}}", devices=10, count=500)
    meter = Meter()
    d = Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=None,  # the routes table is the config
        extra_env=meter.env,
        args=["--config", str(config)],
    )
    sims = [
        Simulation(broker.url, json_fleet, rate=200),
        Simulation(
            broker.url,
            value_fleet,
            rate=60,
            parts=VALUE_PARTS,
            extra=("--format", "value", "--first-device", "1001"),
        ),
    ]
    total_rows = (json_fleet.messages + value_fleet.messages) * READINGS
    try:
        d.start().wait_subscribed()
        for sim in sims:
            sim.start()
        for kill in range(3):
            target = (kill + 1) * total_rows // 5
            wait_until(partial(lambda n: rows_now(database_url) >= n, target), 120, what="rows")
            meter.scrape()
            d.kill()
            d.start().wait_subscribed()
            meter.restarted()
        report = _merged(*(sim.report() for sim in sims))
        t0 = time.monotonic()
        wait_rows(database_url, total_rows, timeout=180)
        recovery = time.monotonic() - t0
        meter.scrape()
        assert d.stop() == 0
    finally:
        for sim in sims:
            sim.close()
        d.close()
    figures = {**reconcile(database_url, report), **counted(meter)}
    assert figures["rows"] == total_rows
    assert figures["duplicates"] > 0 or figures["received"] > report["published"], figures
    fault_report.append(
        {
            "fault": "SIGKILL x3, two routes (json + value)",
            **figures,
            "recovery_s": round(recovery, 1),
        }
    )
