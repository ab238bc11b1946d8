"""Several hosts, one shared subscription, and the network between them cut.

Two ingest hosts (``ing1``, ``ing2``) run ``ingest run`` in namespaces of their own, with the
same INGEST_SHARE_GROUP and their own client ids, against the broker host and the database host
of the lab (conftest.py); a publisher host runs ``simulate`` at QoS 1. Each test cuts links of
``ing1`` mid-stream and then checks the outcome in the database: every ``seq`` of every device
stored exactly once (no gap, no copy: SQL and ``ingest audit``), and ``ing2`` writing all along.
The daemons' own counters come from their ``/metrics``, scraped inside their namespace.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.harness import READINGS, Meter
from tests.integration.hosts.lab import INFLIGHT, Database, Lab
from tests.integration.support import Daemon, unique_topic, wait_until

pytestmark = pytest.mark.slow

METRICS_PORT = 9600  # every host has its own loopback: the same port everywhere
DEVICES, RATE = 20, 5.0  # 100 messages per second over the fleet, ~50 to each host

# Settings of the ingest hosts: a dead broker link noticed within seconds (keepalive), a
# database write that hangs given up after 5 s, reconnects and retries at most 1 s apart.
HOST_ENV = {
    "INGEST_MQTT_KEEPALIVE": "5",
    "INGEST_MQTT_INFLIGHT": str(INFLIGHT),
    "INGEST_DB_WRITE_TIMEOUT": "5",
    "INGEST_DB_CONNECT_TIMEOUT": "3",
    "INGEST_METRICS_PORT": str(METRICS_PORT),
    "INGEST_RETRY_MAX_DELAY": "1",
    "INGEST_STATS_INTERVAL": "5",
}

WRITTEN = "ingest_readings_written_total"
RECEIVED = "ingest_messages_received_total"
UNACKNOWLEDGED = "ingest_messages_unacknowledged"
DEPTH, CAPACITY = "ingest_channel_depth", "ingest_channel_capacity"
SUBSCRIBED = "ingest_broker_subscribed"
DISCONNECTS = "ingest_broker_disconnects_total"
DUPLICATES = "ingest_readings_duplicates_total"


class IngestHost:
    """``ingest run`` in host ``name`` of the lab."""

    def __init__(self, lab: Lab, name: str, db: Database, topic: str, group: str) -> None:
        self.lab, self.name = lab, name
        self.daemon = Daemon(
            database_url=db.url,
            mqtt_url=lab.broker_url,
            topic=topic,
            client_id=f"ingest-{name}-{uuid.uuid4().hex[:6]}",
            extra_env={**HOST_ENV, "INGEST_SHARE_GROUP": group},
            prefix=lab.net.exec(name),
        )
        self._meter = Meter(port=METRICS_PORT)

    @property
    def client_id(self) -> str:
        return self.daemon.client_id

    def metrics(self) -> dict[str, float]:
        """Its counters, read over its own loopback (no cut reaches that)."""
        return self.lab.net.call(self.name, self._meter.scrape)

    def readyz(self) -> int:
        def get() -> int:
            url = f"http://127.0.0.1:{METRICS_PORT}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as e:
                return e.code

        return self.lab.net.call(self.name, get)


@contextlib.contextmanager
def ingest_hosts(lab: Lab, db: Database, topic: str) -> Iterator[tuple[IngestHost, IngestHost]]:
    """``ing1`` and ``ing2`` subscribed in one share group; drained (exit 0) at the end."""
    group = f"hosts-{uuid.uuid4().hex[:6]}"
    one, two = (IngestHost(lab, name, db, topic, group) for name in ("ing1", "ing2"))
    try:
        for host in (one, two):
            host.daemon.start()
        for host in (one, two):
            host.daemon.wait_subscribed(timeout=90)
        yield one, two
        for host in (one, two):
            if host.daemon.proc is not None and host.daemon.proc.poll() is None:
                assert host.daemon.stop(timeout=60) == 0, host.daemon.log_text()[-3000:]
    finally:
        for host in (one, two):
            host.daemon.close()


class Stream:
    """``simulate`` in the publisher host: ``DEVICES`` devices at ``RATE`` messages per second
    each, QoS 1, until stopped (or ``count`` messages per device)."""

    def __init__(
        self, lab: Lab, topic: str, *, count: int | None = None, first_device: int = 1
    ) -> None:
        self._args = [
            *lab.net.exec("pub"), sys.executable, "-m", "simulators",
            "--mqtt-url", lab.broker_url, "--topic", topic, "--qos", "1",
            "--devices", str(DEVICES), "--rate", str(RATE), "--first-device", str(first_device),
            "--report", "json", "--quiet",
            *(["--count", str(count)] if count is not None else []),
        ]  # fmt: skip
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Stream:
        self._proc = subprocess.Popen(
            self._args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return self

    def report(self, *, stop: bool = True) -> dict[str, Any]:
        """Stop it (SIGINT: it waits for the outstanding PUBACKs) and read its report."""
        assert self._proc is not None
        if stop:
            self._proc.send_signal(signal.SIGINT)
        out, err = self._proc.communicate(timeout=120)
        assert self._proc.returncode == 0, f"simulate exited {self._proc.returncode}: {err}"
        report: dict[str, Any] = json.loads(out)
        assert report["failed"] == 0, report
        return report

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> Stream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_writing(*hosts: IngestHost) -> None:
    for host in hosts:

        def writes(host: IngestHost = host) -> bool:
            return host.metrics().get(WRITTEN, 0) > 0

        wait_until(writes, 60, what=f"{host.name} writes")


def stored_samples(lab: Lab, db: Database) -> int:
    rows = lab.sql(db.local, "SELECT count(*) FROM readings WHERE metric = 'seq'")
    return int(rows[0][0])


def reconcile(lab: Lab, db: Database, topic: str, *reports: dict[str, Any]) -> dict[str, Any]:
    """Wait until every published sample is stored, then prove it exactly: per device ``seq``
    1..N each once, ``READINGS`` readings per sample, no dead letter; ``ingest audit`` run in
    the database host agrees (no gap, nothing missing)."""
    expected: dict[str, tuple[int, int, int, int]] = {}
    for report in reports:
        for device, figures in report["per_device"].items():
            if (n := figures["last_seq"]) > 0:
                expected[device] = (n, n, 1, n)
    samples = sum(n for n, *_ in expected.values())
    t0 = time.monotonic()
    wait_until(lambda: stored_samples(lab, db) >= samples, 90, 0.5, f"{samples} samples stored")
    landed_s = time.monotonic() - t0
    rows = lab.sql(
        db.local,
        "SELECT device_id, count(*) AS n, count(DISTINCT value) AS seqs,"
        " min(value) AS lo, max(value) AS hi"
        " FROM readings WHERE metric = 'seq' GROUP BY device_id",
    )
    found = {r["device_id"]: (r["n"], r["seqs"], int(r["lo"]), int(r["hi"])) for r in rows}
    assert found == expected
    readings = lab.sql(db.local, "SELECT count(*) FROM readings")[0][0]
    assert readings == samples * READINGS
    assert lab.sql(db.local, "SELECT count(*) FROM dead_letters")[0][0] == 0
    audit = subprocess.run(
        [*lab.net.exec("db"), sys.executable, "-m", "ingest", "audit", "--json",
         "--since", "1970-01-01T00:00:00Z"],
        env={"INGEST_DATABASE_URL": db.local, "INGEST_TOPIC": topic, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    totals = json.loads(audit.stdout)["totals"]
    assert (totals["rows"], totals["seq_gaps"], totals["seq_missing"]) == (readings, 0, 0), totals
    return {"samples": samples, "readings": readings, "landed_s": round(landed_s, 1)}


def test_a_host_cut_off_mid_stream_for_20s_loses_and_doubles_nothing(lab: Lab) -> None:
    """ing1 loses both its links for 20 s while the fleet keeps publishing: what the broker
    had sent it is redelivered after it returns, what came meanwhile waited in its session,
    ing2 wrote its share all along."""
    db, topic = lab.database(), unique_topic()
    with ingest_hosts(lab, db, topic) as (one, two), Stream(lab, topic) as stream:
        wait_writing(one, two)
        with lab.net.cut_off("ing1"):
            time.sleep(2)
            before = two.metrics()[WRITTEN]
            time.sleep(18)
            during = two.metrics()[WRITTEN]
            cut_one = one.metrics()
        restored = time.monotonic()
        assert during > before, "ing2 stopped writing while ing1 was cut off"
        time.sleep(3)  # the fleet publishes on after the link is back
        report = stream.report()
        figures = reconcile(lab, db, topic, report)
        after = one.metrics()
        print(
            f"\nhost cut off 20 s: {report['published']} published, {figures}, ing2 wrote"
            f" {during - before:.0f} readings during the cut; ing1 saw the broker as"
            f" subscribed={cut_one[SUBSCRIBED]:.0f} at the end of the cut, then"
            f" {after[DISCONNECTS]:.0f} disconnect(s), {after[DUPLICATES]:.0f} duplicate"
            f" readings absorbed; all stored {time.monotonic() - restored:.1f} s after the"
            " link came back"
        )
        assert after[WRITTEN] > cut_one[WRITTEN], "ing1 wrote nothing after it came back"


def test_b_host_removed_for_good_is_retired_from_the_survivor(lab: Lab) -> None:
    """ing1 is killed for good mid-stream. The broker keeps dispatching its share of the
    group to ing1's session, where nobody reads it; ``ingest sessions retire <ing1's id>`` run
    in ing2's host drains that session through the normal pipeline and ends it, after which
    everything published before and after has landed once."""
    db, topic = lab.database(), unique_topic()
    with ingest_hosts(lab, db, topic) as (one, two), Stream(lab, topic) as stream:
        wait_writing(one, two)
        # A host dies after its daemon recorded its session (within a second of connecting);
        # one killed sooner is not in the table and must be retired with --broker.
        recorded = "SELECT count(*) FROM sessions WHERE client_id = $1"
        wait_until(lambda: lab.sql(db.local, recorded, one.client_id)[0][0] == 1, 30, 0.5,
                   "ing1's session recorded")  # fmt: skip
        one.daemon.kill()
        before = two.metrics()[WRITTEN]
        time.sleep(8)
        assert two.metrics()[WRITTEN] > before, "ing2 stopped writing when ing1 was killed"
        report = stream.report()
        wait_until(lambda: two.metrics()[UNACKNOWLEDGED] == 0, 60, 0.5, "ing2 idle")
        time.sleep(2)
        stranded = report["samples"] - stored_samples(lab, db)
        assert stranded > 0, "the broker sent the killed host's session nothing to keep"
        help_ = subprocess.run(
            [*lab.net.exec("ing2"), sys.executable, "-m", "ingest", "sessions", "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if help_.returncode != 0:
            pytest.skip(
                f"{stranded} samples wait in ing1's session as expected; `ingest sessions` is"
                " not on this branch (it comes with the sessions work), so the retire step and"
                " the final reconciliation run once it is merged"
            )
        # --force: killed seconds ago, ing1 has not been away long enough for the sessions
        # table to rule out that it is still connected.
        retire = subprocess.run(
            [*lab.net.exec("ing2"), sys.executable, "-m", "ingest", "sessions", "retire",
             one.client_id, "--idle", "3", "--force"],
            env={"PATH": "/usr/bin:/bin", "INGEST_DATABASE_URL": db.url,
                 "INGEST_MQTT_URL": lab.broker_url, "INGEST_TOPIC": topic,
                 "INGEST_SHARE_GROUP": two.daemon.env["INGEST_SHARE_GROUP"],
                 "INGEST_METRICS_PORT": "0"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert retire.returncode == 0, retire.stdout[-3000:] + retire.stderr[-3000:]
        retired = lab.sql(
            db.local, "SELECT retired_at FROM sessions WHERE client_id = $1", one.client_id
        )
        assert len(retired) == 1 and retired[0]["retired_at"] is not None, retired
        # Published after the retirement: none of it may go to ing1's ended session.
        with Stream(lab, topic, count=20, first_device=DEVICES + 1) as burst:
            later = burst.report(stop=False)
        figures = reconcile(lab, db, topic, report, later)
        print(
            f"\nhost killed and retired: {report['published']} + {later['published']}"
            f" published, {stranded} samples drained from the retired session, {figures}"
        )


def test_c_database_link_cut_stalls_writes_and_backpressure_holds(lab: Lab) -> None:
    """ing1 loses its link to the database host for 15 s: its writes stall, it holds no more
    than the in-flight window and stops reading once that is full (the rest of its share waits
    at the broker, its session undisturbed), /readyz says so; ing2 writes on; when the link is
    back everything lands once."""
    db, topic = lab.database(), unique_topic()
    with ingest_hosts(lab, db, topic) as (one, two), Stream(lab, topic) as stream:
        wait_writing(one, two)
        seen: list[tuple[float, dict[str, float], int]] = []
        with lab.net.cut_off("ing1", "back"):
            cut = time.monotonic()
            before = two.metrics()[WRITTEN]
            while (t := time.monotonic() - cut) < 15:
                seen.append((t, one.metrics(), one.readyz()))
                time.sleep(1)
            during = two.metrics()[WRITTEN]
        assert during > before, "ing2 stopped writing while ing1's database link was cut"
        stalled = [m for t, m, _ in seen if t >= 1]
        assert len({m[WRITTEN] for m in stalled}) == 1, "ing1 committed with no database link"
        assert max(m[UNACKNOWLEDGED] for _, m, _ in seen) <= INFLIGHT
        assert max(m[DEPTH] for _, m, _ in seen) <= seen[0][1][CAPACITY]
        full = [m[RECEIVED] for _, m, _ in seen if m[UNACKNOWLEDGED] >= INFLIGHT]
        assert full, "ing1 never filled its in-flight window: the stream was too slow to tell"
        assert len(set(full)) == 1, "ing1 kept reading with its window full"
        assert all(m[SUBSCRIBED] == 1 for _, m, _ in seen), "the broker session was disturbed"
        assert 503 in (ready for *_, ready in seen), "/readyz never said ing1 was not ready"
        report = stream.report()
        figures = reconcile(lab, db, topic, report)
        wait_until(lambda: one.readyz() == 200, 30, what="ing1 ready again")
        print(
            f"\ndatabase link cut 15 s: {report['published']} published, {figures}; ing1 held"
            f" {max(m[UNACKNOWLEDGED] for _, m, _ in seen):.0f} messages at most (window"
            f" {INFLIGHT}), ing2 wrote {during - before:.0f} readings meanwhile"
        )


def test_d_broker_link_cut_reconnects_and_loses_nothing(lab: Lab) -> None:
    """ing1 loses its link to the broker host for 18 s: the keepalive notices the silent
    link, ing1 reconnects once it is back and resumes its session (what it had committed but
    not acknowledged comes again and is absorbed); ing2 writes on."""
    db, topic = lab.database(), unique_topic()
    with ingest_hosts(lab, db, topic) as (one, two), Stream(lab, topic) as stream:
        wait_writing(one, two)
        with lab.net.cut_off("ing1", "front"):
            cut = time.monotonic()
            before = two.metrics()[WRITTEN]
            noticed = wait_until(
                lambda: one.metrics()[SUBSCRIBED] == 0, 17, 0.5, "ing1 unsubscribed"
            )
            time.sleep(max(0.0, 18 - (time.monotonic() - cut)))
            during = two.metrics()[WRITTEN]
        assert during > before, "ing2 stopped writing while ing1's broker link was cut"
        back = wait_until(lambda: one.metrics()[SUBSCRIBED] == 1, 60, 0.5, "ing1 subscribed again")
        time.sleep(3)  # the fleet publishes on after the link is back
        report = stream.report()
        figures = reconcile(lab, db, topic, report)
        after = one.metrics()
        assert after[DISCONNECTS] >= 1
        print(
            f"\nbroker link cut 18 s: {report['published']} published, {figures}; ing1 noticed"
            f" in {noticed:.1f} s, subscribed again {back:.1f} s after the link came back,"
            f" {after[DUPLICATES]:.0f} duplicate readings absorbed"
        )
