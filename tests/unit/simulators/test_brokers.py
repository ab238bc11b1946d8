"""``simulate --mqtt-url A --mqtt-url B``: the fleet dealt over several brokers (no sockets)."""

from __future__ import annotations

import pytest

from simulators import ConfigError, SimulatorConfig
from simulators._publisher import Stats
from simulators._report import ProcessResult, build_report
from simulators._runner import _fleet
from simulators.cli import build_parser, config_from_args

A = "mqtt://127.0.0.1:1883"
B = "mqtt://127.0.0.1:1884"


def config(argv: list[str], env: dict[str, str] | None = None) -> SimulatorConfig:
    return config_from_args(build_parser().parse_args(argv), env or {})


def test_repeated_url_or_a_list_in_the_environment() -> None:
    c = config(["--mqtt-url", A, "--mqtt-url", "mqtt://u:pw@127.0.0.1:1884"])
    assert [b.name() for b in c.brokers] == [A, B] and c.broker == c.brokers[0]
    assert c.brokers[1].password == "pw"
    c = config([], {"INGEST_MQTT_URL": f"{A},{B}"})
    assert [b.name() for b in c.brokers] == [A, B]
    assert config(["--mqtt-url", A]).brokers == (config(["--mqtt-url", A]).broker,)


def test_a_broker_given_twice_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--mqtt-url: mqtt://127\.0\.0\.1:1883 is given twice"):
        config(["--mqtt-url", A, "--mqtt-url", "mqtt://u:pw@127.0.0.1:1883"])
    with pytest.raises(ConfigError, match="INGEST_MQTT_URL: an empty broker"):
        config([], {"INGEST_MQTT_URL": f"{A},"})


def test_device_i_goes_to_broker_i_mod_k_each_on_its_own_connections() -> None:
    c = SimulatorConfig(mqtt_url=f"{A},{B},mqtt://127.0.0.1:1885", devices=10, connections=4)
    _, publishers = _fleet(c, 0, Stats())
    for p in publishers:
        k = [b.name() for b in c.brokers].index(p._url.name())
        assert all(d.index % 3 == k for d in p._devices), p.name
    assert sorted(d.index for p in publishers for d in p._devices) == list(range(10))
    # 4 connections over 3 brokers: 2, 1, 1.
    assert [p.name for p in publishers] == ["p0b0c0", "p0b0c1", "p0b1c0", "p0b2c0"]
    # Fewer connections than brokers: every broker still gets one.
    c = SimulatorConfig(mqtt_url=f"{A},{B}", devices=4, connections=1)
    assert len(_fleet(c, 0, Stats())[1]) == 2


def test_the_report_has_per_broker_counts_only_with_several() -> None:
    c = SimulatorConfig(mqtt_url=f"{A},{B}", devices=3, count=2)
    parts = [
        ProcessResult(published=4, messages=4, brokers={A: (2, 4, 4, 0)}, connections=1),
        ProcessResult(published=1, failed=1, messages=2, brokers={B: (1, 2, 1, 1)}, connections=1),
    ]
    report = build_report(c, parts, started=0.0, stopped=None, nominal=2.0, scheduled=6)
    data = report.to_json()
    assert (data["published"], data["failed"], data["devices"]) == (5, 1, 3)
    assert data["brokers"] == {
        A: {"devices": 2, "messages": 4, "published": 4, "failed": 0},
        B: {"devices": 1, "messages": 2, "published": 1, "failed": 1},
    }
    assert data["mqtt_url"] == f"{A},{B}" and data["connections"] == 2
    assert f"broker    {B}: 1 devices, published 1, failed 1" in report.to_text()
    one = SimulatorConfig(mqtt_url=A, devices=3, count=2)
    single = build_report(
        one, [ProcessResult()], started=0.0, stopped=None, nominal=2.0, scheduled=6
    )
    assert "brokers" not in single.to_json()
