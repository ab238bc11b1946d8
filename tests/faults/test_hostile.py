"""A hostile fleet through the real daemon (real Mosquitto, real PostgreSQL): oversized
payloads, too many readings, far timestamps, control characters in names and extreme values,
mixed with broken and good messages, reconciled device by device and reason by reason, with
the daemon's memory flat (docs/design.md, Limits).

``simulate --hostile-ratio`` reports, per device, its bad messages by kind
(``simulators._faults.REASONS`` names the dead letter reason of each); every message of the run
is acknowledged by the broker, so for each device: published = stored + dead letters.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.throwaway import MosquittoFactory
from simulators._faults import EXTREME_VALUES, REASONS
from tests.faults.harness import READINGS, Fleet, Meter, peak_rss_mb, rss_mb
from tests.integration.support import Daemon, query, scalar, unique_topic, wait_until

pytestmark = pytest.mark.slow

#: How much the daemon's peak RSS may exceed its RSS before the run. The run publishes about
#: 100 oversized messages of 1 MiB each (and 15 MB of refused readings): a daemon that kept
#: them, or built their readings, would grow by about that much.
RSS_GROWTH_BOUND_MB = 40.0


@pytest.fixture
def broker(mosquitto_factory: MosquittoFactory) -> Broker:
    return mosquitto_factory()


def simulate(mqtt_url: str, fleet: Fleet, *, hostile: float, bad: float) -> dict[str, Any]:
    """Publish ``fleet`` at QoS 1 with the hostile and malformed mixes; the JSON report."""
    proc = subprocess.run(
        [sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url,
         "--devices", str(fleet.devices), "--count", str(fleet.count), "--rate", "1000000",
         "--topic", fleet.topic, "--qos", "1", "--seed", "20261130",
         "--hostile-ratio", str(hostile), "--bad-ratio", str(bad),
         "--report", "json", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    assert report["failed"] == 0 and report["published"] == report["messages"], report
    return report


def stored_seqs(url: str) -> dict[str, int]:
    """Distinct ``seq`` values stored per device."""
    rows = query(
        url,
        "SELECT device_id, count(DISTINCT value) AS n FROM readings"
        " WHERE metric = 'seq' GROUP BY device_id",
    )
    return {r["device_id"]: r["n"] for r in rows}


def dead_letters(url: str) -> dict[str, Counter[str]]:
    """Dead letters per device (the topic's middle level) and reason."""
    rows = query(url, "SELECT topic, reason, count(*) AS n FROM dead_letters GROUP BY 1, 2")
    out: dict[str, Counter[str]] = {}
    for r in rows:
        out.setdefault(r["topic"].split("/")[1], Counter())[r["reason"]] += r["n"]
    return out


def expected_dead_letters(figures: dict[str, Any]) -> Counter[str]:
    expected: Counter[str] = Counter()
    for kind, n in figures["bad_kinds"].items():
        expected[REASONS[kind]] += n
    return expected


def print_table(
    capsys: pytest.CaptureFixture[str], report: dict[str, Any], found: Counter[str]
) -> None:
    """kind -> published, dead letters of its reason, reason (a reason two kinds share is
    shown on both rows)."""
    extreme = report["faults"]["extreme"]
    lines = [
        "",
        "hostile mix reconciliation (kind | published | dead letters | reason)",
        f"valid | {report['samples']} | 0 | stored (extreme values: {extreme} of them)",
    ]
    for kind, n in report["faults"]["bad_kinds"].items():
        if n:
            reason = REASONS[kind]
            lines.append(f"{kind} | {n} | {found[reason]} | {reason}")
    with capsys.disabled():  # figures for the closing note, shown whatever the outcome
        print("\n".join(lines))


def test_hostile_fleet_reconciled_per_device(
    database_url: str,
    broker: Broker,
    fault_report: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = Fleet(topic=unique_topic(), devices=10, count=200)
    meter = Meter()
    d = Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=fleet.topic,
        extra_env=meter.env,
    )
    try:
        d.start().wait_subscribed()
        before = rss_mb(d)
        t0 = time.monotonic()
        report = simulate(broker.url, fleet, hostile=0.3, bad=0.05)
        published = report["published"]

        def settled() -> bool:
            values = meter.scrape()
            return (
                values.get("ingest_messages_received_total"),
                values.get("ingest_messages_unacknowledged"),
            ) == (published, 0)

        wait_until(settled, 180, what="every message received and acknowledged")
        took = time.monotonic() - t0
        peak = peak_rss_mb(d)
        assert d.stop() == 0
    finally:
        d.close()

    per_device = report["per_device"]
    seqs = stored_seqs(database_url)
    letters = dead_letters(database_url)
    found: Counter[str] = sum(letters.values(), Counter())
    kinds = report["faults"]["bad_kinds"]
    rows = scalar(database_url, "SELECT count(*) FROM readings")
    print_table(capsys, report, found)
    fault_report.append(
        {
            "fault": f"hostile mix ({sum(kinds.values())} bad of {published}, "
            f"{kinds['oversized']} over 1 MiB; {published / took:.0f} msg/s incl. publishing)",
            "published": published,
            "rows": rows,
            "dead_letters": sum(found.values()),
            "received": meter.total("ingest_messages_received_total"),
            "recovery_s": "",
            "peak_rss_mb": f"{peak} (from {before})",
        }
    )

    assert len(per_device) == fleet.devices
    for device, figures in per_device.items():
        good = figures["messages"] - figures["bad"]
        assert figures["last_seq"] == good  # one sample per message
        # Every good message stored, each seq once; every bad one a dead letter of its reason.
        assert seqs.get(device, 0) == good, device
        assert letters.get(device, Counter()) == expected_dead_letters(figures), device
        assert figures["published"] == seqs.get(device, 0) + sum(letters[device].values())
    assert rows == report["samples"] * READINGS

    # Every kind came up, and the extreme values were stored as sent.
    assert all(kinds[k] > 0 for k in ("oversized", "too_many_readings", "control_chars"))
    assert kinds["ts_year_9999"] > 0 and kinds["ts_before_2000"] > 0
    extreme = report["faults"]["extreme"]
    assert extreme > 0
    stored_max = scalar(
        database_url, "SELECT count(*) FROM readings WHERE value = $1", EXTREME_VALUES[0]
    )
    assert stored_max == extreme

    # Memory flat: nowhere near the bytes of the oversized messages that went through.
    assert peak - before < RSS_GROWTH_BOUND_MB, (before, peak)

    # An oversized message is kept in part (its first 64 KiB) with its size on the wire.
    kept = query(
        database_url,
        "SELECT max(length(payload)) AS kept, min(payload_size) AS size FROM dead_letters"
        " WHERE reason = 'too_large'",
    )[0]
    assert kept["kept"] <= 64 * 1024
    assert kept["size"] is not None, "too_large dead letters must record payload_size"
    assert kept["size"] > 1 << 20
