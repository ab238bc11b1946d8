"""What the fault tests share: the fleet published by the simulator, the daemon's counters read
from its ``/metrics``, its memory read from ``/proc``, and the reconciliation of what the
simulator reports as published against what the database holds.

The fleet is published by ``simulate`` (the project's own publisher, in a subprocess), which
reports exactly what the broker acknowledged: per device, samples ``seq`` 1..N, each with a
timestamp no other sample of that device has, five readings each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ingest.devservers import free_port
from tests.integration.support import Daemon, query, scalar

READINGS = 5  # per valid sample of the simulator: seq, temperature, humidity, battery, rssi

RECEIVED = "ingest_messages_received_total"
DUPLICATES = "ingest_readings_duplicates_total"
UNACKNOWLEDGED = "ingest_messages_unacknowledged"
WINDOW = "ingest_inflight_window"


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """``devices`` devices sending ``count`` messages each on ``topic`` (a template; empty:
    the format's own, as Sparkplug's)."""

    topic: str
    devices: int
    count: int

    @property
    def messages(self) -> int:
        return self.devices * self.count


class Simulation:
    """``simulate`` publishing ``fleet`` at QoS 1 in a subprocess; ``rate`` is messages per
    second per device (None: as fast as the broker takes them); ``extra``: more flags, and
    ``parts`` the MQTT publishes one message is (6 with ``--format value``)."""

    def __init__(
        self,
        mqtt_url: str,
        fleet: Fleet,
        *,
        rate: float | None = None,
        bad_ratio: float = 0.0,
        extra: tuple[str, ...] = (),
        parts: int = 1,
    ) -> None:
        self._args = [
            sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url,
            "--devices", str(fleet.devices), "--count", str(fleet.count),
            "--rate", str(rate or 1_000_000), *(("--topic", fleet.topic) if fleet.topic else ()),
            "--qos", "1",
            "--bad-ratio", str(bad_ratio), "--report", "json", "--quiet", *extra,
        ]  # fmt: skip
        self._parts = parts
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Self:
        self._proc = subprocess.Popen(
            self._args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def report(self, timeout: float = 300) -> dict[str, Any]:
        """Wait for the end; every message must have been acknowledged by the broker."""
        assert self._proc is not None, "start() first"
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            raise
        assert self._proc.returncode == 0, f"simulate exited {self._proc.returncode}: {err}"
        report: dict[str, Any] = json.loads(out)
        assert report["failed"] == 0, report
        assert report["published"] == report["messages"] * self._parts, report
        return report

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def publish(mqtt_url: str, fleet: Fleet, **kwargs: Any) -> dict[str, Any]:
    """Publish ``fleet`` and return the simulator's report."""
    return Simulation(mqtt_url, fleet, **kwargs).start().report()


def _parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition: each metric's samples summed over their labels."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


@dataclass
class Meter:
    """The daemon's counters over its runs (a restart starts them at 0 again): each run
    counts with its last scrape, so scrape just before every kill or stop."""

    port: int = field(default_factory=free_port)
    runs: list[dict[str, float]] = field(default_factory=lambda: [{}])

    @property
    def env(self) -> dict[str, str]:
        return {"INGEST_METRICS_PORT": str(self.port)}

    def scrape(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            values = _parse_metrics(response.read().decode())
        self.runs[-1] = values
        return values

    def restarted(self) -> None:
        self.runs.append({})

    def total(self, name: str) -> int:
        return int(sum(run.get(name, 0.0) for run in self.runs))


def _proc_status_mb(d: Daemon, key: str) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith(key):
            return round(int(line.split()[1]) / 1024, 1)
    raise AssertionError(f"no {key} in /proc/{d.proc.pid}/status")


def peak_rss_mb(d: Daemon) -> float:
    return _proc_status_mb(d, "VmHWM:")


def rss_mb(d: Daemon) -> float:
    return _proc_status_mb(d, "VmRSS:")


def rows_now(url: str) -> int:
    return int(scalar(url, "SELECT count(*) FROM readings") or 0)


def reconcile(url: str, report: dict[str, Any], *, dead: int = 0) -> dict[str, Any]:
    """Every sample the simulator published is stored exactly once: per device, ``seq`` values
    1..N each once (N from the report), five readings each; ``dead`` dead letters."""
    expected = {
        device: (n, n, 1, n)
        for device, figures in report["per_device"].items()
        if (n := figures["last_seq"]) > 0
    }
    per_device = query(
        url,
        "SELECT device_id, count(*) AS n, count(DISTINCT value) AS seqs,"
        " min(value) AS lo, max(value) AS hi"
        " FROM readings WHERE metric = 'seq' GROUP BY device_id",
    )
    found = {r["device_id"]: (r["n"], r["seqs"], int(r["lo"]), int(r["hi"])) for r in per_device}
    assert found == expected
    samples = sum(n for n, *_ in expected.values())
    assert samples == report["samples"], report
    rows = rows_now(url)
    assert rows == samples * READINGS
    dead_found = scalar(url, "SELECT count(*) FROM dead_letters")
    assert dead_found == dead
    # The operator tool agrees (and is tested by this suite).
    totals = audit(url)["totals"]
    assert (totals["rows"], totals["seq_gaps"], totals["seq_missing"]) == (rows, 0, 0), totals
    return {"published": report["published"], "rows": rows, "dead_letters": dead_found}


def audit(url: str, *flags: str) -> dict[str, Any]:
    """``ingest audit --json`` of the whole table; ``flags``: more (``--report``, ``--config``)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingest",
            "audit",
            "--json",
            "--since",
            "1970-01-01T00:00:00Z",
            *flags,
        ],
        env={"INGEST_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def counted(meter: Meter) -> dict[str, Any]:
    """The figures the daemon itself counted, summed over its runs."""
    return {"received": meter.total(RECEIVED), "duplicates": meter.total(DUPLICATES)}
