"""``ingest audit`` / ``ingest replay`` without a database: time arguments, the simulator report,
reconciliation rules, output, and configuration errors (exit 2 before any connection)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.cli import main
from ingest.errors import ConfigError
from ingest.tools.audit import (
    AuditResult,
    DeviceAudit,
    DeviceExpectation,
    SeqStats,
    SimReport,
    format_table,
    load_report,
    parse_time,
    reconcile,
)
from ingest.tools.replay import GONE, MOVED, REJECTED, ReplaySummary

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
# Nothing listens here: a test that reached the database would fail, not hang.
NO_DB = "postgresql://nobody@127.0.0.1:9/none"


# --- parse_time ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01t10:00:00z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01 10:00:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),  # no offset: UTC
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00:00.250Z", datetime(2024, 5, 1, 10, 0, 0, 250_000, tzinfo=UTC)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("now", NOW),
        (" NOW ", NOW),
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("7d", NOW - timedelta(days=7)),
        ("1w", NOW - timedelta(weeks=1)),
        ("0m", NOW),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    got = parse_time(text, now=NOW)
    assert got == expected
    assert got.tzinfo is UTC


def test_parse_time_converts_offsets_to_utc() -> None:
    got = parse_time("2024-05-01T12:00:00-05:00", now=NOW)
    assert got.utcoffset() == timedelta(0)
    assert got == datetime(2024, 5, 1, 17, tzinfo=UTC)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "15", "15x", "-5m", "m", "2024-13-01", "2024-05-01T25:00", "12:00"]
)
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_time(text, now=NOW, setting="--until")
    assert info.value.setting == "--until"
    assert "RFC 3339" in str(info.value)


# --- the simulator report --------------------------------------------------------------------


def _report(**extra: object) -> dict[str, object]:
    data: dict[str, object] = {
        "published": 25,
        "failed": 0,
        "seconds": 1.5,
        "rate": 16.6,
        "devices": 2,
        "samples": 40,
        "samples_per_message": 2,
        "faults": {"bad": 3, "bad_kinds": {}, "duplicate": 2, "late": 0},
    }
    data.update(extra)
    return data


def test_load_report_totals_only() -> None:
    r = load_report(json.dumps(_report()))
    assert r == SimReport(
        published=25,
        failed=0,
        devices=2,
        samples=40,
        bad=3,
        duplicates=2,
        samples_per_message=2,
        per_device=None,
    )


def test_load_report_per_device() -> None:
    per_device = {
        "dev-00001": {"messages": 12, "published": 13, "failed": 0, "last_seq": 20, "bad": 2,
                      "duplicates": 1, "late": 0},
        "dev-00002": {"messages": 11, "published": 12, "failed": 1, "bad": 1},
    }  # fmt: skip
    r = load_report(json.dumps(_report(per_device=per_device)))
    assert r.per_device == {
        "dev-00001": DeviceExpectation(samples=20, published=13, failed=0, bad=2, duplicates=1),
        # no last_seq: (messages - bad) x samples per message
        "dev-00002": DeviceExpectation(samples=20, published=12, failed=1, bad=1, duplicates=0),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"failed": 0, "devices": 1}), "no 'published' count"),
        (json.dumps(_report(published=-1)), "'published' is -1"),
        (json.dumps(_report(failed="0")), "'failed' is '0'"),
        (json.dumps(_report(per_device={"d": 3})), "per_device['d'] is not an object"),
    ],
)
def test_load_report_rejects(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_report(text, "r.json")
    assert info.value.setting == "--report"
    assert message in str(info.value)


# --- reconciliation --------------------------------------------------------------------------


def _seq(first: int, last: int, gaps: list[tuple[int, int]], repeats: int = 0) -> SeqStats:
    missing = sum(b - a + 1 for a, b in gaps)
    return SeqStats(
        first=first,
        last=last,
        rows=last - first + 1 - missing + repeats,
        repeats=repeats,
        gaps=len(gaps),
        missing=missing,
        first_gaps=gaps[:5],
    )


def _device(device_id: str, first: int, last: int, gaps: list[tuple[int, int]]) -> DeviceAudit:
    seq = _seq(first, last, gaps)
    samples = last - first + 1 - seq.missing
    return DeviceAudit(device_id, rows=samples * 5, samples=samples, seq=seq)


def _result(devices: list[DeviceAudit], report: SimReport | None = None) -> AuditResult:
    return AuditResult(
        since=None,
        until=None,
        template="devices/{device_id}/telemetry",
        devices=devices,
        unmatched_dead_letters=Counter(),
        samples_per_message=report.samples_per_message if report else 1,
        report=report,
    )


def test_no_report_gaps_are_problems() -> None:
    ok = _device("a", 1, 100, [])
    gappy = _device("b", 1, 100, [(10, 12), (50, 50)])
    result = _result([ok, gappy])
    verdict = reconcile(result)
    assert not verdict.ok
    assert ok.ok and ok.unexplained_missing == 0
    assert gappy.unexplained_missing == 4
    assert verdict.problems == ["b: 4 seq missing in 2 gap(s): 10-12, 50"]
    assert verdict.line.startswith("verdict: GAPS: 2 devices, 196 samples")


def test_no_report_gap_found_in_a_dead_letter_is_explained() -> None:
    d = _device("b", 1, 100, [(50, 50)])
    d.dead_letters = d.dead_letters_decodable = d.dead_letter_samples = 1
    d.dead_letter_seqs = {50}
    verdict = reconcile(_result([d]))
    assert verdict.ok, verdict.problems
    assert d.unexplained_missing == 0
    assert verdict.line.startswith("verdict: NO GAPS")


def test_many_gaps_are_counted_and_the_list_is_cut() -> None:
    gaps = [(i * 10, i * 10) for i in range(1, 9)]
    d = _device("a", 1, 100, gaps)
    reconcile(_result([d]))
    assert d.problems == ["8 seq missing in 8 gap(s): 10, 20, 30, 40, 50 (+3 more)"]


def _per_device_report(**devices: DeviceExpectation) -> SimReport:
    return SimReport(
        published=sum(e.published or 0 for e in devices.values()),
        failed=sum(e.failed for e in devices.values()),
        devices=len(devices),
        # like simulate's: valid samples of the messages published (failed ones excluded)
        samples=sum((e.samples or 0) - e.failed for e in devices.values()),
        bad=sum(e.bad for e in devices.values()),
        duplicates=0,
        samples_per_message=1,
        per_device=dict(devices),
    )


def _exp(samples: int, failed: int = 0, bad: int = 0) -> DeviceExpectation:
    return DeviceExpectation(
        samples=samples, published=samples + bad - failed, failed=failed, bad=bad, duplicates=0
    )


def test_report_per_device_reconciles() -> None:
    a = _device("a", 1, 100, [])
    a.dead_letters = 2
    report = _per_device_report(a=_exp(100, bad=2))
    a.expected = report.per_device["a"] if report.per_device else None
    verdict = reconcile(_result([a], report))
    assert verdict.ok, verdict.problems
    assert verdict.line.startswith("verdict: RECONCILED")


def test_report_head_and_tail_are_missing_ranges() -> None:
    a = _device("a", 3, 98, [(50, 51)])
    a.expected = _exp(100)
    verdict = reconcile(_result([a], _per_device_report(a=_exp(100))))
    assert a.missing_ranges == [(1, 2), (50, 51), (99, 100)]
    assert a.unexplained_missing == 6
    assert "a: 6 of 100 samples missing: seq 1-2, 50-51, 99-100" in verdict.problems
    assert not verdict.ok


def test_report_failed_publishes_are_slack() -> None:
    a = _device("a", 1, 98, [])
    a.expected = _exp(100, failed=2)
    verdict = reconcile(_result([a], _per_device_report(a=_exp(100, failed=2))))
    assert verdict.ok, verdict.problems
    assert any("within the 2 failed publishes" in n for n in a.notes)
    # One more missing than the failed publishes can explain.
    b = _device("b", 1, 97, [])
    b.expected = _exp(100, failed=2)
    assert not reconcile(_result([b], _per_device_report(b=_exp(100, failed=2)))).ok


def test_report_missing_and_extra_dead_letters() -> None:
    a = _device("a", 1, 10, [])
    a.expected = _exp(10, bad=3)
    a.dead_letters = 2
    verdict = reconcile(_result([a], _per_device_report(a=_exp(10, bad=3))))
    assert "a: 2 dead letters for 3 bad messages sent" in verdict.problems
    a.dead_letters = 4  # redelivered dead letters: noted, not a failure
    verdict = reconcile(_result([a], _per_device_report(a=_exp(10, bad=3))))
    assert verdict.ok, verdict.problems
    assert any("no natural key" in n for n in a.notes)


def test_report_device_with_nothing_and_extra_samples() -> None:
    silent = DeviceAudit("s", expected=_exp(5))
    loud = _device("l", 1, 12, [])
    loud.expected = _exp(10)
    verdict = reconcile(_result([silent, loud], _per_device_report(s=_exp(5), l=_exp(10))))
    assert "s: 5 of 5 samples missing (no seq field to say which)" in verdict.problems
    assert "l: seq 1..12 outside the 1..10 published" in verdict.problems
    assert "l: 2 samples more than the 10 generated" in verdict.problems


def test_report_totals_only() -> None:
    report = SimReport(
        published=105, failed=0, devices=2, samples=200, bad=5, duplicates=0,
        samples_per_message=1, per_device=None,
    )  # fmt: skip
    a, b = _device("a", 1, 100, []), _device("b", 1, 100, [])
    a.dead_letters = 5
    assert reconcile(_result([a, b], report)).ok
    b = _device("b", 1, 100, [(7, 7)])
    verdict = reconcile(_result([a, b], report))
    assert "total: 199 samples found, 200 published" in verdict.problems
    assert "total: 1 seq missing inside the devices' ranges" in verdict.problems
    verdict = reconcile(_result([a], report))
    assert "total: data from 1 devices of 2" in verdict.problems


def test_table_and_json_say_duplicates_are_not_known_per_device() -> None:
    result = _result([_device("a", 1, 10, [(4, 5)])])
    result.unmatched_dead_letters["bad_topic"] = 2
    reconcile(result)
    text = format_table(result)
    assert "a: 2 seq missing in 1 gap(s): 4-5" in text
    assert "duplicates absorbed: n/a" in text
    assert "topics not matching devices/{device_id}/telemetry: bad_topic 2" in text
    assert text.splitlines()[-1].startswith("verdict: GAPS")
    data = result.to_json()
    assert data["devices"][0]["duplicates_absorbed"] is None
    assert data["totals"]["dead_letters"] == 2
    json.dumps(data)  # serializable


def test_table_lists_only_problem_devices_past_fifty() -> None:
    devices = [_device(f"d{i:03d}", 1, 10, []) for i in range(60)]
    devices[7] = _device("d007", 1, 10, [(3, 3)])
    result = _result(devices)
    reconcile(result)
    text = format_table(result)
    assert "d007" in text and "d008" not in text
    assert "... 59 more devices, all ok" in text


# --- replay summary --------------------------------------------------------------------------


def test_replay_summary_format() -> None:
    s = ReplaySummary(dry_run=False, examined=6, moved=3, readings_inserted=10,
                      readings_present=2, still_failing=2, rejected=1)  # fmt: skip
    s.outcomes.update({("bad_topic", MOVED): 3, ("not_json", "not_json"): 2,
                       ("rejected_by_database", REJECTED): 1, ("bad_ts", GONE): 1})  # fmt: skip
    text = s.format()
    assert "not_json             -> still not_json" in text
    assert "bad_topic            -> moved" in text
    assert "moved 3 dead letters: 10 readings inserted, 2 already present" in text
    assert "1 rejected by the database" in text
    assert "bad_ts               -> gone (moved by another replay)" in text
    dry = ReplaySummary(dry_run=True, examined=1, moved=1)
    dry.outcomes[("bad_topic", MOVED)] = 1
    assert "-> would move" in dry.format()
    assert "dry run: nothing changed" in dry.format()


# --- command line: configuration errors exit 2 before connecting -----------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "--since", "yesterday"],
        ["audit", "--since", "1h", "--until", "2h"],
        ["audit", "--report", "/nonexistent/report.json"],
        ["audit", "--topic", "devices/+/telemetry"],
        ["replay", "--since", "soon"],
        ["replay", "--database-url", "mysql://x"],
    ],
)
def test_config_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    if "--database-url" not in argv:
        argv = [*argv, "--database-url", NO_DB]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ingest: configuration error: ")
    assert len(err.strip().splitlines()) == 1


def test_bad_report_content_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "report.json"
    path.write_text("published 10\n")
    assert main(["audit", "--report", str(path), "--database-url", NO_DB]) == 2
    assert "--report" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["replay", "--batch", "0"], ["audit", "--samples-per-message", "x"]]
)
def test_bad_numbers_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_a_sparkplug_fleet_report_reconciles_devices_and_nodes() -> None:
    # simulate --format sparkplug: devices named as the daemon stores them, the edge node
    # listed with its NBIRTHs as messages (no seq), before_birth messages as bad.
    report = load_report(
        json.dumps(
            {
                "published": 40, "failed": 0, "devices": 1, "samples": 40, "samples_per_message": 1,
                "faults": {"bad": 3, "bad_kinds": {"before_birth": 3}, "duplicate": 0},
                "per_device": {
                    "sim/node-0001": {"messages": 2, "published": 2, "failed": 0, "bad": 0},
                    "sim/node-0001/dev-00001": {
                        "messages": 41, "published": 41, "failed": 0, "last_seq": 38, "bad": 3,
                    },
                },
            }
        )
    )  # fmt: skip
    assert report.per_device is not None
    assert report.per_device["sim/node-0001"].samples == 2
    device = _device("sim/node-0001/dev-00001", 1, 38, [])
    device.dead_letters = 3  # unknown_alias: undecodable without the births
    device.dead_letter_reasons["unknown_alias"] = 3
    node = DeviceAudit("sim/node-0001", rows=4, samples=2)
    device.expected = report.per_device[device.device_id]
    node.expected = report.per_device[node.device_id]
    verdict = reconcile(_result([device, node], report))
    assert verdict.ok, verdict.problems
    # A lost NBIRTH is a problem of the node like any missing sample.
    node.samples = 1
    assert reconcile(_result([device, node], report)).problems[0].startswith("sim/node-0001: 1 ")
