"""``ingest`` command line: flags come from the settings' metadata, configuration errors exit 2
with one line naming the setting and never the secret."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from ingest import cli
from ingest.settings import Settings, help_text


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _squeezed(text: str) -> str:
    return "".join(text.split())  # argparse also breaks lines after hyphens


def test_run_help_describes_every_setting_from_its_metadata(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = _help(capsys, "run")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["secret"]:
            assert flag not in text, f"{flag}: a secret on the command line shows in ps"
            continue
        assert flag in text
        assert _squeezed(help_text(f)) in _squeezed(text), f.name
    assert "settings: limits on one device message" in text
    assert not hasattr(cli, "_HELP")


def test_migrate_help_has_only_its_settings(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "migrate")
    assert "--database-url" in text and "--batch-max-rows" not in text


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_BATCH_MAX_ROWS", "20")
    args = cli._parser().parse_args(["run", "--batch-max-rows", "30", "--no-migrate"])
    settings = cli._settings(args)
    assert settings.batch_max_rows == 30 and settings.migrate is False


def test_configuration_error_exits_2_naming_both_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    monkeypatch.setenv("INGEST_MQTT_PASSWORD", "hunter3")
    monkeypatch.setenv("INGEST_MQTT_PASSWORD_FILE", str(secret))
    assert cli.main(["migrate"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "INGEST_MQTT_PASSWORD and INGEST_MQTT_PASSWORD_FILE" in err
    assert "hunter" not in err


def test_bad_duration_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["migrate", "--config", "/nonexistent.toml"]) == cli.EXIT_CONFIG
    assert "--config" in capsys.readouterr().err
    monkeypatch.setenv("INGEST_MAX_TS_AHEAD", "soon")
    assert cli.main(["migrate"]) == cli.EXIT_CONFIG
    assert "INGEST_MAX_TS_AHEAD" in capsys.readouterr().err


def test_a_stray_url_in_an_argument_error_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "extra", "mqtt://u:Sup3rSecret@broker"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Sup3rSecret" not in err
    assert "mqtt://u:***@broker" in err
