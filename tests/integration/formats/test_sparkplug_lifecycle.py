"""A Sparkplug B edge node end to end, through a real daemon, broker and database: birth, data,
death and rebirth with hand-built payloads (the schema's classes, not the decoder), then the
simulator's fleet with data sent before its births, answered by a Rebirth request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from ingest.formats.sparkplug_schema import DataType, Payload
from tests.integration.support import Daemon, Publisher, query, scalar, wait_until

UNIT = "engUnit"


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def sparkplug_daemon(database_url: str, mqtt_url: str, tmp_path: Path, group: str) -> Daemon:
    config = tmp_path / "ingest.toml"
    config.write_text(f'[[routes]]\ntopic = "spBv1.0/{group}/#"\nformat = "sparkplug"\n')
    return Daemon(
        database_url=database_url,
        mqtt_url=mqtt_url,
        topic=None,
        args=["--config", str(config)],
        # Every unknown alias may ask again soon: the fleet test's faults come seconds apart.
        extra_env={"INGEST_SPARKPLUG_REBIRTH_INTERVAL": "0.2"},
    )


def metric(p: Any, name: str | None, alias: int, datatype: int, **value: Any) -> Any:
    m = p.metrics.add(alias=alias, datatype=datatype, **value)
    if name is not None:
        m.name = name
    return m


def nbirth(ts: int, bdseq: int) -> bytes:
    p = Payload(timestamp=ts, seq=0)
    p.metrics.add(name="bdSeq", datatype=DataType.Int64, long_value=bdseq)
    metric(p, "Node Control/Rebirth", 1, DataType.Boolean, boolean_value=False)
    return bytes(p.SerializeToString())


def ndeath(ts: int, bdseq: int) -> bytes:
    p = Payload(timestamp=ts)
    p.metrics.add(name="bdSeq", datatype=DataType.Int64, long_value=bdseq)
    return bytes(p.SerializeToString())


def dbirth_a(ts: int, seq: int, temperature: float) -> bytes:
    """Device a: a Double with a unit, a String, a negative Int32, a Boolean."""
    p = Payload(timestamp=ts, seq=seq)
    t = metric(p, "temperature", 10, DataType.Double, double_value=temperature)
    t.properties.keys.append(UNIT)
    t.properties.values.add(type=DataType.String, string_value="°C")
    metric(p, "state", 11, DataType.String, string_value="idle")
    metric(p, "count", 12, DataType.Int32, int_value=-5 & 0xFFFFFFFF)
    metric(p, "ok", 13, DataType.Boolean, boolean_value=True)
    return bytes(p.SerializeToString())


def dbirth_b(ts: int, seq: int) -> bytes:
    """Device b: declared with a unit and no value yet."""
    p = Payload(timestamp=ts, seq=seq)
    t = metric(p, "temperature", 20, DataType.Double, is_null=True)
    t.properties.keys.append(UNIT)
    t.properties.values.add(type=DataType.String, string_value="°F")
    return bytes(p.SerializeToString())


def ddata(ts: int, seq: int, *values: tuple[int, str, Any], metric_ts: int | None = None) -> bytes:
    """Data by alias only: ``(alias, value field, value)``; the last one stamped
    ``metric_ts`` when given."""
    p = Payload(timestamp=ts, seq=seq)
    for i, (alias, field, value) in enumerate(values):
        m = p.metrics.add(alias=alias, **{field: value})
        if metric_ts is not None and i == len(values) - 1:
            m.timestamp = metric_ts
    return bytes(p.SerializeToString())


def statuses(database_url: str, prefix: str) -> dict[str, tuple[str, datetime]]:
    rows = query(
        database_url,
        "SELECT device_id, status, status_at FROM devices WHERE device_id LIKE $1",
        prefix + "%",
    )
    return {r["device_id"]: (r["status"], r["status_at"]) for r in rows}


def test_birth_data_death_rebirth(database_url: str, mqtt_url: str, tmp_path: Path) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    node, a, b = f"{group}/edge1", f"{group}/edge1/a", f"{group}/edge1/b"
    top = f"spBv1.0/{group}"
    t0 = int(time.time() * 1000) - 60_000
    first = [
        (f"{top}/NBIRTH/edge1", nbirth(t0, 0)),
        (f"{top}/DBIRTH/edge1/a", dbirth_a(t0 + 1, 1, 21.5)),
        (f"{top}/DBIRTH/edge1/b", dbirth_b(t0 + 2, 2)),
        (
            f"{top}/DDATA/edge1/a",
            ddata(
                t0 + 10,
                3,
                (10, "double_value", 22.25),
                (11, "string_value", "running"),
                (12, "int_value", 7),
                metric_ts=t0 + 9,
            ),
        ),
        (f"{top}/DDATA/edge1/b", ddata(t0 + 11, 4, (20, "double_value", 70.5))),
        (f"{top}/DDEATH/edge1/a", bytes(Payload(timestamp=t0 + 20, seq=5).SerializeToString())),
        (f"{top}/NDEATH/edge1", ndeath(t0 + 30, 0)),
    ]
    again = [
        (f"{top}/NBIRTH/edge1", nbirth(t0 + 40, 1)),
        (f"{top}/DBIRTH/edge1/a", dbirth_a(t0 + 41, 1, 23.0)),
        (f"{top}/DDATA/edge1/a", ddata(t0 + 50, 2, (10, "double_value", 23.5))),
        # The will of the first session, delivered late: its bdSeq is not the live one's.
        (f"{top}/NDEATH/edge1", ndeath(t0 + 60, 0)),
        (f"{top}/DDATA/edge1/a", ddata(t0 + 70, 3, (10, "double_value", 24.0))),
    ]
    with (
        sparkplug_daemon(database_url, mqtt_url, tmp_path, group) as d,
        Publisher(mqtt_url) as pub,
    ):
        d.wait_subscribed()
        pub.publish_many(first)
        wait_until(lambda: statuses(database_url, node).get(node, ("",))[0] == "offline", 60)
        after_death = statuses(database_url, node)
        pub.publish_many(again)
        last = "SELECT count(*) FROM readings WHERE device_id = $1 AND value = 24"
        wait_until(lambda: scalar(database_url, last, a) == 1, 60, what="the last DDATA")
        assert d.stop() == 0
    # Death: the node and every device it declared offline, at the NDEATH's time (newer than
    # device a's own DDEATH).
    assert after_death == {
        node: ("offline", at(t0 + 30)),
        a: ("offline", at(t0 + 30)),
        b: ("offline", at(t0 + 30)),
    }
    # Rebirth: online again from the births' times; b was not born again; the stale NDEATH
    # changed nothing.
    assert statuses(database_url, node) == {
        node: ("online", at(t0 + 40)),
        a: ("online", at(t0 + 41)),
        b: ("offline", at(t0 + 30)),
    }
    rows = query(
        database_url,
        "SELECT device_id, metric, ts, value FROM readings WHERE device_id LIKE $1"
        " ORDER BY device_id, metric, ts",
        node + "%",
    )
    assert [tuple(r) for r in rows] == [
        (node, "Node Control/Rebirth", at(t0), 0.0),
        (node, "Node Control/Rebirth", at(t0 + 40), 0.0),
        (node, "bdSeq", at(t0), 0.0),
        (node, "bdSeq", at(t0 + 40), 1.0),
        (a, "count", at(t0 + 1), -5.0),
        (a, "count", at(t0 + 9), 7.0),
        (a, "count", at(t0 + 41), -5.0),
        (a, "ok", at(t0 + 1), 1.0),
        (a, "ok", at(t0 + 41), 1.0),
        (a, "temperature", at(t0 + 1), 21.5),
        (a, "temperature", at(t0 + 10), 22.25),
        (a, "temperature", at(t0 + 41), 23.0),
        (a, "temperature", at(t0 + 50), 23.5),
        (a, "temperature", at(t0 + 70), 24.0),
        (b, "temperature", at(t0 + 11), 70.5),
    ]
    texts = query(
        database_url,
        "SELECT device_id, metric, ts, value FROM text_readings WHERE device_id LIKE $1"
        " ORDER BY device_id, metric, ts",
        node + "%",
    )
    assert [tuple(r) for r in texts] == [
        (a, "state", at(t0 + 1), "idle"),
        (a, "state", at(t0 + 10), "running"),
        (a, "state", at(t0 + 41), "idle"),
    ]
    units = query(
        database_url,
        "SELECT device_id, metric, unit FROM series WHERE device_id LIKE $1 AND unit IS NOT NULL"
        " ORDER BY 1, 2",
        node + "%",
    )
    assert [tuple(r) for r in units] == [(a, "temperature", "°C"), (b, "temperature", "°F")]
    assert scalar(database_url, "SELECT count(*) FROM dead_letters") == 0


class CommandWatcher:
    """A test subscriber to the group's NCMD topics (what the daemon asks of edge nodes)."""

    def __init__(self, mqtt_url: str, group: str) -> None:
        host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
        self.seen: list[tuple[str, bytes]] = []
        self._client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=f"watch-{uuid.uuid4().hex[:8]}",
        )
        self._client.on_message = lambda _c, _u, m: self.seen.append((m.topic, bytes(m.payload)))
        self._client.connect(host, int(port))
        self._client.subscribe(f"spBv1.0/{group}/NCMD/+", 1)
        self._client.loop_start()

    def rebirths(self) -> list[str]:
        """The nodes asked to rebirth, one entry per request."""
        out = []
        for topic, payload in list(self.seen):
            metrics = Payload.FromString(payload).metrics
            if any(m.name == "Node Control/Rebirth" and m.boolean_value for m in metrics):
                out.append(topic.rsplit("/", 1)[-1])
        return out

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def simulate(mqtt_url: str, group: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url, "--format", "sparkplug",
            "--group-id", group, "--report", "json", "--quiet", *args,
        ],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def seqs(database_url: str, prefix: str) -> dict[str, list[int]]:
    rows = query(
        database_url,
        "SELECT device_id, array_agg(value::bigint ORDER BY value) AS seqs FROM readings"
        " WHERE metric = 'seq' AND device_id LIKE $1 GROUP BY device_id",
        prefix + "%",
    )
    return {r["device_id"]: list(r["seqs"]) for r in rows}


def test_data_before_birth_is_answered_by_a_rebirth(
    database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    watcher = CommandWatcher(mqtt_url, group)
    try:
        with sparkplug_daemon(database_url, mqtt_url, tmp_path, group) as d:
            d.wait_subscribed()
            # 2 nodes of 2 devices, 60 messages each at 20/s; seed 7 draws a few faults.
            report = simulate(
                mqtt_url, group, "--devices", "4", "--devices-per-node", "2", "--count", "60",
                "--rate", "20", "--bad-ratio", "0.03", "--seed", "7",
            )  # fmt: skip
            samples = report["samples"]
            wait_until(
                lambda: (
                    scalar(database_url, "SELECT count(DISTINCT (device_id, ts)) FROM readings")
                    >= samples
                ),
                60,
                what=f"{samples} samples",
            )
            wait_until(
                lambda: (
                    scalar(database_url, "SELECT count(*) FROM dead_letters")
                    >= report["faults"]["bad"]
                ),
                60,
                what="the dead letters",
            )
            assert d.stop() == 0
        rebirths = watcher.rebirths()
    finally:
        watcher.close()
    bad = report["faults"]["bad"]
    assert bad > 0 and report["faults"]["bad_kinds"] == {"before_birth": bad}, report
    # Every DDATA sent before its birth is one dead letter unknown_alias...
    reasons = query(database_url, "SELECT reason, count(*) AS n FROM dead_letters GROUP BY 1")
    assert {r["reason"]: r["n"] for r in reasons} == {"unknown_alias": bad}
    # ...whose node the daemon asked to rebirth; the simulator answered each request it got
    # with its births, and its data was stored again afterwards: every seq exactly once.
    assert rebirths and set(rebirths) <= {"node-0001", "node-0002"}
    sp = report["sparkplug"]
    assert sp["rebirth_requests"] >= 1 and sp["births"] == 2 + sp["rebirth_requests"]
    per_device = report["per_device"]
    expected = {
        dev: list(range(1, v["last_seq"] + 1)) for dev, v in per_device.items() if "last_seq" in v
    }
    assert seqs(database_url, group) == expected
    for dev, v in per_device.items():
        if "last_seq" in v:
            assert v["last_seq"] + v["bad"] == 60, (dev, v)
    # The nodes' samples are their NBIRTHs (bdSeq and the Rebirth control at each).
    nodes = query(
        database_url,
        "SELECT device_id, count(DISTINCT ts) AS n FROM readings WHERE device_id = ANY($1)"
        " GROUP BY 1",
        [f"{group}/node-0001", f"{group}/node-0002"],
    )
    assert {r["device_id"]: r["n"] for r in nodes} == {
        node: v["published"] for node, v in per_device.items() if "last_seq" not in v
    }
    # The operator's audit reconciles the fleet with the report.
    audit = run_audit(database_url, tmp_path, group, report)
    assert audit["verdict"]["ok"], audit["verdict"]


def run_audit(
    database_url: str, tmp_path: Path, group: str, report: dict[str, Any]
) -> dict[str, Any]:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    config = tmp_path / "ingest.toml"
    proc = subprocess.run(
        [
            sys.executable, "-m", "ingest", "audit", "--json", "--since", "1970-01-01T00:00:00Z",
            "--report", str(path), "--config", str(config),
        ],
        env={"INGEST_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_a_killed_simulator_leaves_its_death_to_the_will(
    database_url: str, mqtt_url: str, tmp_path: Path
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    node = f"{group}/node-0001"
    with sparkplug_daemon(database_url, mqtt_url, tmp_path, group) as d:
        d.wait_subscribed()
        sim = subprocess.Popen(
            [
                sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url, "--format",
                "sparkplug", "--group-id", group, "--devices", "2", "--rate", "5", "--quiet",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            online = dict.fromkeys([node, f"{node}/dev-00001", f"{node}/dev-00002"], "online")
            wait_until(
                lambda: {k: v[0] for k, v in statuses(database_url, node).items()} == online,
                60,
                what="the births",
            )
            births = statuses(database_url, node)
            sim.kill()  # no DDEATH, no NDEATH of its own: the broker publishes the will
            sim.wait(10)
            wait_until(
                lambda: all(s == "offline" for s, _ in statuses(database_url, node).values()),
                60,
                what="the will's NDEATH",
            )
        finally:
            if sim.poll() is None:
                sim.kill()
                sim.wait(10)
        assert d.stop() == 0
    # The will has no timestamp: the receive time, after the births, marks every device of
    # the node offline.
    after = statuses(database_url, node)
    assert after.keys() == births.keys()
    assert all(after[k][1] > births[k][1] for k in births)
