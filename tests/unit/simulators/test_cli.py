"""Command line, settings and report of the simulator (no sockets: every case here fails
validation, or builds a report from counters, before anything would connect).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulators import ConfigError, SimulatorConfig
from simulators._report import ProcessResult, Progress, build_report, progress_line
from simulators.cli import build_parser, config_from_args, main

CONTRACT_FLAGS = [
    "--mqtt-url",
    "--devices",
    "--rate",
    "--count",
    "--duration",
    "--qos",
    "--topic",
    "--seed",
    "--samples-per-message",
    "--bad-ratio",
    "--duplicate-ratio",
    "--late-ratio",
    "--connections",
    "--processes",
    "--report",
    "--quiet",
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--count", "5", "--duration", "3"], "not allowed with"),
        (["--rate", "0"], "--rate"),
        (["--rate", "-2"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--rate", "fast"], "--rate"),
        (["--devices", "0"], "--devices"),
        (["--devices", "1.5"], "--devices"),
        (["--count", "0"], "--count"),
        (["--duration", "inf"], "--duration"),
        (["--qos", "2"], "--qos"),
        (["--bad-ratio", "1.5"], "--bad-ratio"),
        (["--duplicate-ratio", "-0.1"], "--duplicate-ratio"),
        (["--late-ratio", "2"], "--late-ratio"),
        (["--samples-per-message", "0"], "--samples-per-message"),
        (["--seed", "-1"], "--seed"),
        (["--topic", "devices/telemetry"], "{device_id}"),
        (["--topic", "d/{device_id}/{device_id}"], "{device_id}"),
        (["--topic", "d/x{device_id}/t"], "{device_id}"),
        (["--topic", "d/+/{device_id}"], "'+'"),
        (["--topic", "d/{device_id}/{metric}"], "{metric}"),
        (["--mqtt-url", "http://localhost"], "--mqtt-url"),
        (["--mqtt-url", "mqtt://localhost:99999"], "--mqtt-url"),
        (["--devices", "4", "--connections", "5"], "--connections"),
        (["--devices", "4", "--processes", "2", "--connections", "1"], "--connections"),
        (["--devices", "2", "--processes", "3"], "--processes"),
        (["--report", "xml"], "--report"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("simulate: error: ")
    assert names in err
    assert "Traceback" not in err


def test_bad_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INGEST_MQTT_URL", "tcp://broker")
    code, _out, err = run_cli([], capsys)
    assert code == 2 and "INGEST_MQTT_URL" in err
    monkeypatch.setenv("INGEST_MQTT_URL", "mqtt://127.0.0.1:1")
    monkeypatch.setenv("INGEST_TOPIC", "sensors/{device_id}/{metric}")
    code, _out, err = run_cli([], capsys)
    assert code == 2 and "INGEST_TOPIC" in err


def test_help_explains_every_contract_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(["--help"], capsys)
    assert code == 0
    for flag in CONTRACT_FLAGS:
        assert flag in out
    for words in ("per second per device", "dev-00001", "seq", "exit status", "examples"):
        assert words in out


def test_flags_override_environment_which_overrides_defaults() -> None:
    parser = build_parser()
    env = {"INGEST_MQTT_URL": "mqtt://envhost:1884", "INGEST_TOPIC": "t/{device_id}"}
    config = config_from_args(parser.parse_args([]), env)
    assert config.broker.host == "envhost" and config.broker.port == 1884
    assert config.topic == "t/{device_id}"
    config = config_from_args(
        parser.parse_args(["--mqtt-url", "mqtt://cli:1885", "--topic", "x/{device_id}/y"]), env
    )
    assert config.broker.port == 1885 and config.topic == "x/{device_id}/y"
    config = config_from_args(parser.parse_args([]), {})
    assert config.mqtt_url == "mqtt://localhost:1883"
    assert config.topic == "devices/{device_id}/telemetry"


def test_config_defaults() -> None:
    config = SimulatorConfig()
    assert (config.devices, config.rate, config.qos, config.processes) == (10, 1.0, 1, 1)
    assert config.count is None and config.duration is None  # until interrupted
    assert config.connections == 4
    assert isinstance(config.seed, int)
    assert SimulatorConfig(devices=2).connections == 2
    assert SimulatorConfig(devices=100, processes=3).connections == 12
    assert SimulatorConfig(devices=100, rate=0.1).target_rate == 10.0


def test_config_errors_are_config_errors_naming_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        SimulatorConfig(count=1, duration=1.0)
    assert info.value.setting == "--count"
    with pytest.raises(ConfigError) as info:
        SimulatorConfig(rate=0.0)
    assert info.value.setting == "--rate"


def result(**counts: int) -> ProcessResult:
    r = ProcessResult(failures={"disconnected": 0, "unacknowledged": 0})
    for name, value in counts.items():
        setattr(r, name, value)
    return r


def test_report_merges_processes_and_measures_the_rate() -> None:
    config = SimulatorConfig(devices=10, rate=10.0, count=20, seed=5, duplicate_ratio=0.1)
    a = result(messages=100, published=110, duplicates=10, published_duplicates=10, samples=100)
    b = result(messages=100, published=104, duplicates=6, published_duplicates=4, failed=2)
    a.finished, b.finished = 1001.9, 1001.95  # the last slot is due 1.9 s after the start
    b.failures["unacknowledged"] = 2
    report = build_report(config, [a, b], started=1000.0, stopped=None, nominal=2.0, scheduled=200)
    assert report.published == 214 and report.failed == 2
    assert report.messages == 200 and report.faults["duplicate"] == 16
    assert report.seconds == 2.0  # measured over the whole schedule
    assert report.rate == 100.0  # duplicates do not count towards the rate
    assert report.on_target and report.exit_status == 1
    assert report.failures == {"disconnected": 0, "unacknowledged": 2}
    data = report.to_json()
    json.dumps(data)
    for key in ("published", "failed", "seconds", "rate", "devices", "target_rate", "faults"):
        assert key in data
    assert set(data["faults"]) == {"bad", "bad_kinds", "duplicate", "late"}
    assert "per_device" not in data


def test_report_says_when_the_target_was_missed() -> None:
    config = SimulatorConfig(devices=100, rate=100.0, duration=10.0, seed=1)
    slow = result(messages=50_000, published=50_000)
    slow.finished = 1010.2
    slow.max_lag = 4.0
    report = build_report(
        config, [slow], started=1000.0, stopped=None, nominal=10.0, scheduled=100_000
    )
    assert not report.on_target and report.exit_status == 0
    text = report.to_text()
    assert "BELOW TARGET" in text and "could not keep up" in text
    assert "50,000 of 100,000 scheduled" in text


def test_report_of_an_interrupted_run() -> None:
    config = SimulatorConfig(devices=2, rate=1.0, seed=1)
    r = result(messages=6, published=6)
    r.finished = 1003.05
    r.devices = {"dev-00001": (3, 3, 0, 3, 0, 0, 0), "dev-00002": (3, 3, 0, 3, 0, 0, 0)}
    report = build_report(config, [r], started=1000.0, stopped=1003.0, nominal=None, scheduled=None)
    assert report.interrupted and report.seconds == pytest.approx(3.05)
    assert report.per_device is not None
    assert report.per_device["dev-00002"]["last_seq"] == 3
    assert "(interrupted)" in report.to_text()


def test_progress_line() -> None:
    line = progress_line(Progress(2.0, 2000, 3, 2003, 0.01, 1000.0))
    assert "published 2,000" in line and "failed 3" in line and "1,000.0 msg/s" in line
    assert "\n" not in line


CONNECTION_FLAGS = ["--username", "--password-file", "--ca-file", "--cert-file", "--key-file"]


def test_help_explains_the_credential_and_tls_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(["--help"], capsys)
    assert code == 0
    for flag in CONNECTION_FLAGS:
        assert flag in out
    for variable in ("INGEST_MQTT_CA_FILE", "INGEST_MQTT_PASSWORD_FILE", "INGEST_MQTT_USERNAME"):
        assert variable in out


SECRET = "Sup3rSecret"


@pytest.mark.parametrize(
    "url",
    [
        f"mqtt://ingest:{SECRET}/x@127.0.0.1",
        f"mqtt://ingest:{SECRET}?x@127.0.0.1",
        f"mqtt://ingest:{SECRET}#x@127.0.0.1",
        f"mqtt://ingest:{SECRET}@x@127.0.0.1",
        f"mqtt://ingest:{SECRET}[@127.0.0.1",
        f"mqtt://ingest:{SECRET}@127.0.0.1:99999",
        f"mqtt://ingest:{SECRET}@127.0.0.1/path",
        f"tcp://ingest:{SECRET}@127.0.0.1",
        f"ingest:{SECRET}@127.0.0.1",
    ],
)
def test_a_bad_url_never_shows_its_password(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["--mqtt-url", url], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("simulate: error: --mqtt-url: ")
    assert SECRET not in err
    monkeypatch.setenv("INGEST_MQTT_URL", url)
    code, out, err = run_cli([], capsys)
    assert code == 2 and err.startswith("simulate: error: INGEST_MQTT_URL: ")
    assert SECRET not in err


def test_a_stray_url_argument_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_cli(["--count", "1", f"mqtt://u:{SECRET}@h"], capsys)
    assert code == 2 and "unrecognized arguments" in err
    assert SECRET not in err and "mqtt://u:***@h" in err


def config(argv: list[str], env: dict[str, str] | None = None) -> SimulatorConfig:
    return config_from_args(build_parser().parse_args(argv), env or {})


def test_credentials_from_flags_files_and_environment_win_over_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    c = config(["--mqtt-url", "mqtt://u:url-pw@h", "--password-file", str(secret)])
    assert (c.broker.username, c.broker.password) == ("u", "from-file")
    c = config(["--mqtt-url", "mqtt://u:url-pw@h", "--username", "flag-user"])
    assert (c.broker.username, c.broker.password) == ("flag-user", "url-pw")
    env = {"INGEST_MQTT_USERNAME": "env-user", "INGEST_MQTT_PASSWORD_FILE": str(secret)}
    c = config([], env)
    assert (c.broker.username, c.broker.password) == ("env-user", "from-file")
    c = config([], {"INGEST_MQTT_USERNAME": "env-user", "INGEST_MQTT_PASSWORD": "env-pw"})
    assert (c.broker.username, c.broker.password) == ("env-user", "env-pw")
    assert "env-pw" not in repr(c) and "env-pw" not in c.broker.redacted()
    secret.write_text("two\nlines\n\n")  # only one trailing newline is the file's
    assert config(["--username", "u", "--password-file", str(secret)]).broker.password == (
        "two\nlines\n"
    )


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["--password-file", "/nonexistent/pw"], {}, "--password-file: cannot read"),
        (["--password-file", "."], {}, "--password-file: cannot read"),
        ([], {"INGEST_MQTT_PASSWORD_FILE": "/nonexistent/pw"}, "INGEST_MQTT_PASSWORD_FILE:"),
        ([], {"INGEST_MQTT_PASSWORD": "x"}, "needs a user name"),
        (
            [],
            {
                "INGEST_MQTT_USERNAME": "u",
                "INGEST_MQTT_PASSWORD": "x",
                "INGEST_MQTT_PASSWORD_FILE": "{text}",
            },
            "INGEST_MQTT_PASSWORD_FILE: not allowed with INGEST_MQTT_PASSWORD",
        ),
        (["--username", ""], {}, "--username"),
        (["--mqtt-url", "mqtts://h", "--ca-file", "/nonexistent/ca.pem"], {}, "--ca-file"),
        (["--mqtt-url", "mqtts://h", "--ca-file", "."], {}, "--ca-file: cannot read"),
        (["--mqtt-url", "mqtts://h", "--ca-file", "{text}"], {}, "--ca-file: no usable"),
        (["--mqtt-url", "mqtts://h", "--cert-file", "/nonexistent.pem"], {}, "--cert-file"),
        (["--mqtt-url", "mqtts://h", "--cert-file", "{text}"], {}, "--cert-file: no usable"),
        (
            ["--mqtt-url", "mqtts://h", "--cert-file", "{text}", "--key-file", "/nope"],
            {},
            "--key-file: cannot read",
        ),
        (["--mqtt-url", "mqtts://h", "--key-file", "{text}"], {}, "needs --cert-file"),
        (["--mqtt-url", "mqtt://h", "--ca-file", "{text}"], {}, "plaintext"),
        (["--mqtt-url", "mqtt://h"], {"INGEST_MQTT_CA_FILE": "{text}"}, "INGEST_MQTT_CA_FILE"),
        (
            ["--mqtt-url", "mqtts://h"],
            {"INGEST_MQTT_CERT_FILE": "/nonexistent.pem"},
            "INGEST_MQTT_CERT_FILE: cannot read",
        ),
    ],
)
def test_unusable_credential_and_tls_files_exit_2_naming_the_setting(
    argv: list[str],
    env: dict[str, str],
    names: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = tmp_path / "not-pem.txt"  # readable, but no certificate or key in it
    text.write_text("hello\n")
    for name in [v for v in os.environ if v.startswith("INGEST_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(text=text))
    code, out, err = run_cli([a.format(text=text) for a in argv], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("simulate: error: ")
    assert names in err
    assert "Traceback" not in err


def test_the_simulator_never_imports_the_daemons_decoding() -> None:
    # The Sparkplug B schema (message classes only) is the payload contract itself, as the
    # wire codec is the MQTT one; the decoder (ingest.formats.sparkplug) stays out.
    code = (
        "import sys, simulators.cli, simulators._runner; "
        "print(sorted(m for m in sys.modules if m.startswith(('ingest', 'asyncpg', 'aiomqtt'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(
        [
            "ingest",
            "ingest._version",
            "ingest.formats",
            "ingest.formats.sparkplug_schema",
            "ingest.mqtt",
            "ingest.mqtt.wire",
            "ingest.urls",
        ]
    )
