"""``ingest audit`` and ``ingest replay`` against a real PostgreSQL (and, end to end, with the
daemon and the simulator): exact gaps, reports compared, dead letters moved exactly once."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ingest.cli import main
from ingest.db.dashboard import fold
from ingest.flow.series import SeriesCache
from ingest.model import Decoded, DeviceUpdate, Reading
from ingest.tools import replay as replay_module
from tests.integration.support import Daemon, migrate, query, unique_topic, wait_until

T0 = datetime(2024, 5, 1, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)
METRICS = ("seq", "temperature", "humidity", "battery", "rssi")
TOPIC = "devices/{device_id}/telemetry"
Row = tuple[str, str, datetime, float]


def _ts(seq: int, base: datetime = T0) -> datetime:
    return base + timedelta(seconds=seq)


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _sample_rows(device: str, seqs: Iterable[int], base: datetime = T0) -> list[Row]:
    return [
        (device, m, _ts(s, base), float(s) if m == "seq" else 20.0) for s in seqs for m in METRICS
    ]


def _payload(device_seqs: Sequence[int], base: datetime = T0, **extra: float) -> bytes:
    samples = [
        {"ts": _ms(_ts(s, base)), "seq": s, **{m: 20.0 for m in METRICS[1:]}, **extra}
        for s in device_seqs
    ]
    return json.dumps(samples[0] if len(samples) == 1 else samples).encode()


def _load(
    url: str,
    readings: Sequence[Row] = (),
    dead: Sequence[tuple[datetime, str, bytes, str]] = (),
) -> list[int]:
    """Store readings and dead letters (received_at, topic, payload, reason); their ids."""

    async def run() -> list[int]:
        conn = await asyncpg.connect(url)
        try:
            if readings:
                await conn.copy_records_to_table(
                    "readings", records=readings, columns=("device_id", "metric", "ts", "value")
                )
            ids = []
            for received_at, topic, payload, reason in dead:
                ids.append(
                    await conn.fetchval(
                        "INSERT INTO dead_letters (received_at, topic, payload, error, reason)"
                        " VALUES ($1, $2, $3, 'original error', $4) RETURNING id",
                        received_at,
                        topic,
                        payload,
                        reason,
                    )
                )
            return ids
        finally:
            await conn.close()

    return asyncio.run(run())


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    status = main([*argv, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out)


def _by_device(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in data["devices"]}


def _topic(device: str) -> str:
    return TOPIC.replace("{device_id}", device)


# --- audit -----------------------------------------------------------------------------------


def test_audit_finds_exactly_the_gaps(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate(database_url)
    now = datetime.now(UTC)
    holes = {7, 20, 21, 22, 40}
    readings = [
        *_sample_rows("dev-00001", range(1, 51)),
        *_sample_rows("dev-00001", [1000, 1002], base=OLD),  # outside the window
        *_sample_rows("dev-00002", [s for s in range(1, 51) if s not in holes]),
        *_sample_rows("dev-00003", [s for s in range(1, 51) if s != 30]),
        *[("dev-00004", "temperature", _ts(s), 1.0) for s in range(10)],  # no seq
    ]
    _load(
        database_url,
        readings,
        [
            (now, _topic("dev-00001"), b"not json", "not_json"),
            (now, _topic("dev-00001"), b'{"ts": "soon", "t": 1}', "bad_ts"),
            (OLD, _topic("dev-00001"), b"old, outside the window", "not_json"),
            # seq 30 of dev-00003: refused by the database back then, decodes now
            (now, _topic("dev-00003"), _payload([30]), "rejected_by_database"),
            (now, "elsewhere/dev-00009", b"{}", "bad_topic"),
        ],
    )
    url = ["--database-url", database_url]

    status, data = _run_json(capsys, "audit", *url, "--since", "2024-05-01T00:00:00Z")
    assert status == 1
    devices = _by_device(data)
    assert sorted(devices) == ["dev-00001", "dev-00002", "dev-00003", "dev-00004"]

    d1 = devices["dev-00001"]
    assert (d1["rows"], d1["samples"], d1["messages_estimated"]) == (250, 50, 50)
    assert d1["seq"]["first"] == 1 and d1["seq"]["last"] == 50 and d1["seq"]["gaps"] == 0
    assert d1["dead_letters"] == 2
    assert d1["dead_letter_reasons"] == {"bad_ts": 1, "not_json": 1}
    assert d1["ok"] and d1["duplicates_absorbed"] is None

    d2 = devices["dev-00002"]
    assert d2["seq"]["first_gaps"] == [[7, 7], [20, 22], [40, 40]]
    assert (d2["seq"]["gaps"], d2["seq"]["missing"], d2["unexplained_missing"]) == (3, 5, 5)
    assert (d2["rows"], d2["samples"]) == (45 * 5, 45)
    assert d2["problems"] == ["5 seq missing in 3 gap(s): 7, 20-22, 40"]

    d3 = devices["dev-00003"]
    assert d3["seq"]["first_gaps"] == [[30, 30]]
    assert d3["dead_letters_decodable"] == 1 and d3["dead_letter_samples"] == 1
    assert d3["unexplained_missing"] == 0 and d3["ok"]

    d4 = devices["dev-00004"]
    assert d4["seq"] is None and d4["samples"] == 10 and d4["ok"]

    assert data["unmatched_dead_letters"] == {"count": 1, "reasons": {"bad_topic": 1}}
    assert data["totals"]["dead_letters"] == 4  # the one received in 2020 is outside
    assert data["verdict"]["problems"] == ["dev-00002: 5 seq missing in 3 gap(s): 7, 20-22, 40"]

    # The window decides: without it, dev-00001's old samples add two gaps (51-999, 1001).
    status, data = _run_json(capsys, "audit", *url)
    d1 = _by_device(data)["dev-00001"]
    assert d1["seq"]["first_gaps"] == [[51, 999], [1001, 1001]]
    assert d1["dead_letters"] == 3

    # Only the devices without gaps: everything reconciles.
    status, data = _run_json(
        capsys, "audit", *url, "--since", "2024-05-01", "--device", "dev-00001", "dev-00003"
    )
    assert status == 0, data["verdict"]
    assert sorted(_by_device(data)) == ["dev-00001", "dev-00003"]
    assert data["unmatched_dead_letters"]["count"] == 0

    # --until is exclusive: seq 1..9 only.
    status, data = _run_json(
        capsys, "audit", *url, "--since", "2024-05-01", "--until", "2024-05-01T00:00:10Z"
    )
    assert _by_device(data)["dev-00002"]["seq"] == {
        "first": 1, "last": 9, "rows": 8, "repeats": 0, "gaps": 1, "missing": 1,
        "first_gaps": [[7, 7]],
    }  # fmt: skip

    # The human table says the same.
    assert main(["audit", *url, "--since", "2024-05-01"]) == 1
    text = capsys.readouterr().out
    assert "dev-00002: 5 seq missing in 3 gap(s): 7, 20-22, 40" in text
    assert text.rstrip().splitlines()[-1].startswith("verdict: GAPS")


def _simulated(url: str, *, drop: Sequence[tuple[str, int]] = ()) -> dict[str, Any]:
    """What a simulator run of 3 devices x 10 messages of 2 samples (1 bad message and, for
    dev-00001, 1 duplicate each) leaves behind; returns its report."""
    readings: list[Row] = []
    dead = []
    per_device = {}
    now = datetime.now(UTC)
    for i in (1, 2, 3):
        dev = f"dev-{i:05d}"
        readings += _sample_rows(dev, [s for s in range(1, 21) if (dev, s) not in drop])
        dead.append(
            (now, _topic(dev), b'{"ts": "2024-13-45T25:61:61Z", "temperature": 1}', "bad_ts")
        )
        dup = 1 if i == 1 else 0
        per_device[dev] = {
            "messages": 11, "published": 11 + dup, "failed": 0, "last_seq": 20, "bad": 1,
            "duplicates": dup, "late": 0,
        }  # fmt: skip
    _load(url, readings, dead)
    return {
        "published": 34, "failed": 0, "seconds": 1.0, "rate": 33.0, "devices": 3,
        "samples": 60, "samples_per_message": 2, "messages": 33,
        "faults": {"bad": 3, "bad_kinds": {"bad_ts": 3}, "duplicate": 1, "late": 0},
        "per_device": per_device,
    }  # fmt: skip


def test_audit_compares_a_simulator_report(
    database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    migrate(database_url)
    report = _simulated(database_url)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    url = ["--database-url", database_url]

    status, data = _run_json(capsys, "audit", *url, "--report", str(path))
    assert status == 0, data["verdict"]
    assert data["verdict"]["line"].startswith("verdict: RECONCILED: 3 devices, 60 samples")
    d1 = _by_device(data)["dev-00001"]
    assert d1["messages_estimated"] == 10  # 20 samples / 2 per message
    assert d1["expected"] == {
        "samples": 20, "published": 12, "failed": 0, "bad": 1, "duplicates_sent": 1
    }  # fmt: skip

    # Totals only (a report without per-device details), through a real process and stdin.
    del report["per_device"]
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "audit", *url, "--report", "-"],
        input=json.dumps(report),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: RECONCILED" in proc.stdout


def test_audit_report_mismatch(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(database_url)
    report = _simulated(database_url, drop=[("dev-00002", 5), ("dev-00002", 20)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(report)))
    status, data = _run_json(capsys, "audit", "--database-url", database_url, "--report", "-")
    assert status == 1
    d2 = _by_device(data)["dev-00002"]
    assert d2["missing_ranges"] == [[5, 5], [20, 20]]
    assert d2["problems"] == ["2 of 20 samples missing: seq 5, 20"]
    assert "total: 58 samples found, 60 published" in data["verdict"]["problems"]
    assert data["verdict"]["line"].startswith("verdict: NOT RECONCILED")


def test_audit_unreachable_database_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--database-url", "postgresql://nobody@127.0.0.1:9/none", "--db-connect-timeout", "2"]
    assert main(["audit", *argv]) == 1
    assert "cannot read the database" in capsys.readouterr().err
    assert main(["replay", *argv]) == 1
    assert "database error" in capsys.readouterr().err


def test_audit_without_migrations_exits_1(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "--database-url", database_url]) == 1
    assert "ingest migrate" in capsys.readouterr().err


def test_audit_never_prints_raw_control_characters(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stored before names were checked, or by another writer: the terminal must not act on it.
    hostile = "dev-\x1b[2J\x07\x9b\u202e"
    migrate(database_url)
    now = datetime.now(UTC)
    _load(
        database_url,
        [*_sample_rows(hostile, [1, 2, 4])],
        [
            (now, _topic(hostile), b"not json \x1b[31m", "not_json"),
            (now, "elsewhere/\x1b]0;title\x07", b"{}", "bad\x1b[5m_topic"),
        ],
    )
    assert main(["audit", "--database-url", database_url]) == 1
    out = capsys.readouterr().out
    controls = [ch for ch in out if ch != "\n" and (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F)]
    assert controls == [] and "\u202e" not in out
    assert "dev-\\x1b[2J\\x07\\x9b\\u202e" in out
    assert "bad\\x1b[5m_topic 1" in out


# --- replay ----------------------------------------------------------------------------------


def _snapshot(url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    readings = query(url, "SELECT device_id, metric, ts, value FROM readings ORDER BY 1, 2, 3")
    dead = query(
        url, "SELECT id, received_at, topic, payload, error, reason FROM dead_letters ORDER BY id"
    )
    return [tuple(r) for r in readings], [tuple(r) for r in dead]


def test_replay_moves_exactly_what_decodes_now(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate(database_url)
    # A constraint the database enforces and the decoder does not know about.
    query(database_url, "ALTER TABLE points ADD CONSTRAINT sane CHECK (value < 1e6)")
    now = datetime.now(UTC)
    dev = _topic("dev-1")
    # Stored before: dl5's two readings (other values: the first write must win) and one of
    # dl7's two.
    existing: list[Row] = [
        ("dev-1", "seq", _ts(5), 500.0),
        ("dev-1", "t", _ts(5), 50.0),
        ("dev-1", "seq", _ts(7), 700.0),
    ]
    ids = _load(
        database_url,
        existing,
        [
            (now, dev, b'{"ts": %d, "seq": 1, "t": 20.5}' % _ms(_ts(1)), "bad_topic"),  # 1
            (now, dev, b'[{"ts": %d, "seq": 2, "t": 1}, {"ts": %d, "seq": 3, "t": 2}]'
             % (_ms(_ts(2)), _ms(_ts(3))), "bad_ts"),  # 2
            (now, dev, b"not json", "not_json"),  # 3: still fails
            (OLD, "elsewhere/dev-1", b'{"t": 1}', "bad_topic"),  # 4: still fails
            (now, dev, b'{"ts": %d, "seq": 5, "t": 5}' % _ms(_ts(5)), "rejected_by_database"),  # 5
            (now, dev, b'{"ts": %d, "seq": 6, "t": 1e9}' % _ms(_ts(6)), "rejected_by_database"),  # 6
            (now, dev, b'{"ts": %d, "seq": 7, "t": 7}' % _ms(_ts(7)), "bad_topic"),  # 7
        ],
    )  # fmt: skip
    dl = dict(enumerate(ids, start=1))
    url = ["--database-url", database_url]
    before = _snapshot(database_url)

    # Dry run: reads only. It cannot know that the database refuses dl6.
    status, data = _run_json(capsys, "replay", *url, "--dry-run")
    assert status == 0
    assert _snapshot(database_url) == before
    assert data == {
        "dry_run": True, "examined": 7, "moved": 5, "readings_inserted": 9,
        "readings_present": 3, "still_failing": 2, "rejected": 0,
        "outcomes": [
            {"reason": "bad_topic", "outcome": "bad_topic", "count": 1},
            {"reason": "bad_topic", "outcome": "moved", "count": 2},
            {"reason": "bad_ts", "outcome": "moved", "count": 1},
            {"reason": "not_json", "outcome": "not_json", "count": 1},
            {"reason": "rejected_by_database", "outcome": "moved", "count": 2},
        ],
        "rejection_errors": [],
    }  # fmt: skip
    status, data = _run_json(capsys, "replay", *url, "--dry-run", "--limit", "3", "--batch", "2")
    assert data["examined"] == 3
    status, data = _run_json(capsys, "replay", *url, "--dry-run", "--since", "2024-01-01")
    assert data["examined"] == 6  # dl4 was received in 2020
    assert _snapshot(database_url) == before

    # The real thing, two dead letters per transaction: dl5 and dl6 share one, and dl6's
    # rejection must not keep dl5 from moving.
    status, data = _run_json(capsys, "replay", *url, "--batch", "2")
    assert status == 0
    assert {k: data[k] for k in ("examined", "moved", "readings_inserted",
                                 "readings_present", "still_failing", "rejected")} == {
        "examined": 7, "moved": 4, "readings_inserted": 7, "readings_present": 3,
        "still_failing": 2, "rejected": 1,
    }  # fmt: skip
    assert {"reason": "rejected_by_database", "outcome": "rejected", "count": 1} in data["outcomes"]
    assert data["rejection_errors"][0].startswith(f"dead letter {dl[6]}:")
    readings, dead = _snapshot(database_url)
    assert [r[0] for r in dead] == [dl[3], dl[4], dl[6]]
    assert dead == [d for d in before[1] if d[0] in (dl[3], dl[4], dl[6])]  # untouched
    assert readings == sorted(
        [
            ("dev-1", "seq", _ts(1), 1.0), ("dev-1", "t", _ts(1), 20.5),
            ("dev-1", "seq", _ts(2), 2.0), ("dev-1", "t", _ts(2), 1.0),
            ("dev-1", "seq", _ts(3), 3.0), ("dev-1", "t", _ts(3), 2.0),
            ("dev-1", "seq", _ts(5), 500.0), ("dev-1", "t", _ts(5), 50.0),  # first write won
            ("dev-1", "seq", _ts(7), 700.0), ("dev-1", "t", _ts(7), 7.0),
        ]
    )  # fmt: skip

    # Again: nothing left that decodes and is accepted; nothing changes.
    after = _snapshot(database_url)
    status, data = _run_json(capsys, "replay", *url)
    assert status == 0
    assert (data["examined"], data["moved"], data["rejected"]) == (3, 0, 1)
    assert _snapshot(database_url) == after

    # The database accepts dl6 now; --reason picks it alone.
    query(database_url, "ALTER TABLE points DROP CONSTRAINT sane")
    assert main(["replay", *url, "--reason", "rejected_by_database", "not_json"]) == 0
    text = capsys.readouterr().out
    assert "examined 2 dead letters" in text
    assert "moved 1 dead letters: 2 readings inserted, 0 already present" in text
    readings, dead = _snapshot(database_url)
    assert [r[0] for r in dead] == [dl[3], dl[4]]
    assert ("dev-1", "t", _ts(6), 1e9) in readings


def test_replay_with_a_new_topic_template(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate(database_url)
    now = datetime.now(UTC)
    ids = _load(
        database_url,
        dead=[
            (now, "site/a/dev-9/data", _payload([1, 2]), "bad_topic"),
            (now, "devices/dev-9/telemetry", _payload([3]), "bad_topic"),
        ],
    )
    url = ["--database-url", database_url, "--topic", "site/a/{device_id}/data"]
    status, data = _run_json(capsys, "replay", *url)
    assert (status, data["moved"], data["readings_inserted"], data["still_failing"]) == (
        0,
        1,
        10,
        1,
    )
    assert [r["id"] for r in query(database_url, "SELECT id FROM dead_letters")] == [ids[1]]
    # And the audit, with the same template, finds dev-9's samples 1-2 and nothing missing.
    status, audit = _run_json(capsys, "audit", *url)
    assert status == 0
    assert _by_device(audit)["dev-9"]["seq"]["last"] == 2
    assert audit["unmatched_dead_letters"]["count"] == 1


def test_replay_with_routes_stores_numbers_and_texts(
    database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Dead letters of a topic no route matched, replayed once a value route takes it: a
    number moves into readings, a text value into text_readings."""
    migrate(database_url)
    now = datetime.now(UTC)
    _load(
        database_url,
        dead=[
            (
                now,
                "stat/plug1/POWER",
                b'{"ts": %d, "value": 42}' % int(T0.timestamp()),
                "bad_topic",
            ),
            (now, "stat/plug1/STATE", b"idle", "bad_topic"),
        ],
    )
    config = tmp_path / "ingest.toml"
    config.write_text('[[routes]]\ntopic = "stat/{device_id}/{metric}"\nformat = "value"\n')
    status, data = _run_json(
        capsys, "replay", "--database-url", database_url, "--config", str(config)
    )
    assert (status, data["moved"], data["readings_inserted"], data["still_failing"]) == (0, 2, 2, 0)
    assert query(database_url, "SELECT id FROM dead_letters") == []
    rows = query(database_url, "SELECT device_id, metric, ts, value FROM readings")
    assert [tuple(r) for r in rows] == [("plug1", "POWER", T0, 42.0)]
    texts = query(database_url, "SELECT device_id, metric, value FROM text_readings")
    assert [tuple(r) for r in texts] == [("plug1", "STATE", "idle")]


def test_replay_stores_texts_and_tags_and_the_dashboard_sees_them(
    database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What the daemon's writer would have stored of a message, replay stores: numeric and
    text readings, tags from the topic and from tag fields, and a dashboard batch, so the
    dashboard tables count the replayed readings (once) after a fold."""
    migrate(database_url)
    t1 = T0 + timedelta(minutes=1)
    payload = json.dumps(
        [
            {"ts": _ms(T0), "temp": 20.0, "state": "open", "model": "x1"},
            {"ts": _ms(T0 + timedelta(seconds=1)), "temp": 22.0, "state": "closed"},
            {"ts": _ms(t1), "temp": 30.0, "model": "x2"},
        ]
    ).encode()
    _load(database_url, dead=[(datetime.now(UTC), "plant/north/dev-7/data", payload, "bad_topic")])
    config = tmp_path / "ingest.toml"
    config.write_text(
        '[[routes]]\ntopic = "plant/{site}/{device_id}/data"\nformat = "json"\n'
        '[routes.json]\ntag_fields = ["model"]\n'
    )
    argv = ["replay", "--database-url", database_url, "--config", str(config)]
    status, data = _run_json(capsys, *argv)
    assert (status, data["moved"], data["readings_inserted"]) == (0, 1, 5)
    assert _run_json(capsys, *argv)[1]["moved"] == 0  # nothing left: idempotent

    async def fold_all() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            while (await fold(conn)).batches:
                pass
        finally:
            await conn.close()

    asyncio.run(fold_all())
    texts = query(database_url, "SELECT metric, ts, value FROM text_readings ORDER BY ts")
    assert [tuple(r) for r in texts] == [
        ("state", T0, "open"),
        ("state", T0 + timedelta(seconds=1), "closed"),
    ]
    device = query(database_url, "SELECT tags, last_ts FROM devices WHERE device_id = 'dev-7'")
    assert [(json.loads(d["tags"]), d["last_ts"]) for d in device] == [
        ({"site": "north", "model": "x2"}, t1)  # the newest tag value wins
    ]
    rollups = query(
        database_url, "SELECT bucket, n, sum, min, max FROM readings_1m ORDER BY bucket"
    )
    assert [tuple(r) for r in rollups] == [(T0, 2, 42.0, 20.0, 22.0), (t1, 1, 30.0, 30.0, 30.0)]
    latest = query(database_url, "SELECT metric, ts, value FROM latest_readings")
    assert [tuple(r) for r in latest] == [("temp", t1, 30.0)]
    latest_text = query(database_url, "SELECT metric, ts, value FROM latest_text")
    assert [tuple(r) for r in latest_text] == [("state", T0 + timedelta(seconds=1), "closed")]


def test_replay_stores_the_units_a_message_gives(database_url: str) -> None:
    """No route format of this version reads units yet; replay stores those a decoded message
    carries as the writer does (on its series), exercised here through its move step."""
    migrate(database_url)
    ids = _load(database_url, dead=[(datetime.now(UTC), "t/dev-u", b"{}", "bad_topic")])
    decoded = Decoded(
        [Reading("dev-u", "temp", T0, 21.5)],
        0,
        updates=[DeviceUpdate("dev-u", units={"temp": "Cel"})],
    )

    async def move() -> tuple[set[int], int, int]:
        conn = await asyncpg.connect(database_url)
        try:
            return await replay_module._move(
                conn, SeriesCache(10), [replay_module._Candidate(ids[0], "bad_topic", decoded)]
            )
        finally:
            await conn.close()

    assert asyncio.run(move()) == ({ids[0]}, 1, 0)
    series = query(database_url, "SELECT device_id, metric, unit FROM series")
    assert [tuple(r) for r in series] == [("dev-u", "temp", "Cel")]
    assert query(database_url, "SELECT id FROM dead_letters") == []


def test_replay_takes_a_dead_letter_of_a_limit_back_after_the_setting_changed(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sample dated 1999 is ts_out_of_range under the default INGEST_MIN_TS; once the
    operator lowers the limit, replay stores it, and only it."""
    migrate(database_url)
    now = datetime.now(UTC)
    y1999 = datetime(1999, 6, 1, tzinfo=UTC)
    ids = _load(
        database_url,
        dead=[
            (now, _topic("dev-old"), _payload([7], base=y1999), "ts_out_of_range"),
            (
                now,
                _topic("dev-far"),
                _payload([8], base=datetime(9000, 1, 1, tzinfo=UTC)),
                "ts_out_of_range",
            ),
        ],
    )
    url = ["--database-url", database_url]
    status, data = _run_json(capsys, "replay", *url)
    assert (status, data["moved"], data["still_failing"]) == (0, 0, 2)
    status, data = _run_json(capsys, "replay", *url, "--min-ts", "1990-01-01T00:00:00Z")
    assert (status, data["moved"], data["readings_inserted"], data["still_failing"]) == (
        0,
        1,
        5,
        1,
    )
    assert [r["id"] for r in query(database_url, "SELECT id FROM dead_letters")] == [ids[1]]
    rows = query(database_url, "SELECT ts FROM readings WHERE device_id = 'dev-old'")
    assert {r["ts"] for r in rows} == {_ts(7, y1999)}


# --- end to end: simulator -> broker -> daemon -> audit ---------------------------------------


def test_simulator_run_reconciles(
    database_url: str, mqtt_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic()
    with Daemon(database_url=database_url, mqtt_url=mqtt_url, topic=topic) as daemon:
        daemon.wait_subscribed()
        sim = subprocess.run(
            [sys.executable, "-m", "simulators", "--mqtt-url", mqtt_url, "--topic", topic,
             "--devices", "4", "--rate", "50", "--count", "25", "--samples-per-message", "2",
             "--bad-ratio", "0.1", "--duplicate-ratio", "0.1", "--late-ratio", "0.05",
             "--seed", "7", "--report", "json", "--quiet"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sim.returncode == 0, sim.stderr
        report = json.loads(sim.stdout)
        argv = ["audit", "--database-url", database_url, "--topic", topic, "--report", "-"]
        result: dict[str, Any] = {}

        def reconciled() -> bool:
            proc = subprocess.run(
                [sys.executable, "-m", "ingest", *argv, "--json"],
                input=sim.stdout, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert proc.returncode in (0, 1), proc.stderr
            result.update(json.loads(proc.stdout))
            return proc.returncode == 0

        try:
            wait_until(reconciled, timeout=60, interval=0.5, what="the audit to reconcile")
        except AssertionError:
            raise AssertionError(json.dumps(result["verdict"], indent=1)) from None
        assert daemon.stop() == 0
    totals = result["totals"]
    assert totals["samples"] == report["samples"]
    assert totals["unexplained_missing"] == 0
    assert totals["dead_letters"] >= report["faults"]["bad"]
    assert totals["rows"] == report["samples"] * 5  # seq, temperature, humidity, battery, rssi
