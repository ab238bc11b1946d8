"""The simulator's report: per-device counters that let a test reconcile a hostile fleet."""

from __future__ import annotations

from simulators import SimulatorConfig
from simulators._faults import BAD_KINDS, HOSTILE_BAD_KINDS
from simulators._report import ProcessResult, build_report


def result(**kinds: int) -> ProcessResult:
    r = ProcessResult(failures={"disconnected": 0, "unacknowledged": 0})
    r.messages = r.published = 10
    r.bad.update(kinds)
    r.extreme = 2
    r.devices = {"dev-00001": (10, 10, 0, 6, sum(kinds.values()), 0, 0)}
    r.kinds = {"dev-00001": (2, dict(kinds))}
    return r


def report(config: SimulatorConfig, r: ProcessResult) -> dict[str, object]:
    built = build_report(config, [r], started=1e9, stopped=None, nominal=1.0, scheduled=10)
    return built.to_json()


def test_hostile_run_reports_every_kind_per_device() -> None:
    config = SimulatorConfig(devices=1, seed=1, hostile_ratio=0.5)
    data = report(config, result(oversized=1, ts_year_9999=1))
    faults = data["faults"]
    assert isinstance(faults, dict)
    assert list(faults["bad_kinds"]) == [*BAD_KINDS, *HOSTILE_BAD_KINDS]
    assert faults["bad"] == 2 and faults["bad_kinds"]["oversized"] == 1
    assert faults["extreme"] == 2
    per_device = data["per_device"]
    assert isinstance(per_device, dict)
    assert per_device["dev-00001"]["bad_kinds"] == {"oversized": 1, "ts_year_9999": 1}
    assert per_device["dev-00001"]["extreme"] == 2
    assert per_device["dev-00001"]["bad"] == 2


def test_run_without_hostile_messages_reports_what_it_always_did() -> None:
    config = SimulatorConfig(devices=1, seed=1, bad_ratio=0.5)
    data = report(config, result(not_json=3))
    faults = data["faults"]
    assert isinstance(faults, dict)
    assert set(faults) == {"bad", "bad_kinds", "duplicate", "late"}
    assert list(faults["bad_kinds"]) == list(BAD_KINDS)


def test_text_report_lists_the_hostile_kinds() -> None:
    config = SimulatorConfig(devices=1, seed=1, hostile_ratio=0.5)
    built = build_report(
        config, [result(control_chars=4)], started=1e9, stopped=None, nominal=1.0, scheduled=10
    )
    text = built.to_text()
    assert "control_chars 4" in text and "extreme 2" in text
