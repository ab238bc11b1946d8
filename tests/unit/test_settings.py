from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.backoff import Backoff
from ingest.errors import ConfigError
from ingest.settings import MqttEndpoint, Settings, load_settings, redact_url, worker_environ


def test_defaults_are_valid() -> None:
    s = Settings()
    assert s.mqtt_url == "mqtt://localhost:1883"
    assert s.topic == "devices/{device_id}/telemetry"
    assert s.client_id.startswith("ingest-")
    assert s.mqtt_protocol == "3.1.1"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(
        '[ingest]\nbatch_max_rows = 10\nclient_id = "from-file"\ntopic = "a/{device_id}"\n'
    )
    env = {"INGEST_BATCH_MAX_ROWS": "20", "INGEST_CLIENT_ID": "from-env"}
    s = load_settings(environ=env, config_file=cfg, overrides={"client_id": "from-flag"})
    assert s.batch_max_rows == 20
    assert s.client_id == "from-flag"
    assert s.topic == "a/{device_id}"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"INGEST_BATCH_MAX_ROWS": "0"}, "INGEST_BATCH_MAX_ROWS"),
        ({"INGEST_BATCH_MAX_ROWS": "many"}, "INGEST_BATCH_MAX_ROWS"),
        ({"INGEST_MQTT_URL": "http://x"}, "INGEST_MQTT_URL"),
        ({"INGEST_MQTT_URL": "mqtt://host:99999"}, "INGEST_MQTT_URL"),
        ({"INGEST_DATABASE_URL": "mysql://x/y"}, "INGEST_DATABASE_URL"),
        ({"INGEST_MQTT_PROTOCOL": "4"}, "INGEST_MQTT_PROTOCOL"),
        ({"INGEST_TOPIC": "devices/telemetry"}, "INGEST_TOPIC"),
        ({"INGEST_METRICS_PORT": "70000"}, "INGEST_METRICS_PORT"),
        ({"INGEST_SHARE_GROUP": "a/b"}, "INGEST_SHARE_GROUP"),
        ({"INGEST_MIGRATE": "perhaps"}, "INGEST_MIGRATE"),
        ({"INGEST_LOG_FORMAT": "xml"}, "INGEST_LOG_FORMAT"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert named in str(info.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("batch_rows = 3\n")
    with pytest.raises(ConfigError, match="batch_rows"):
        load_settings(environ={}, config_file=cfg)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_settings(environ={}, config_file="/nonexistent/ingest.toml")


def test_bool_and_empty_optional() -> None:
    s = load_settings(environ={"INGEST_MIGRATE": "no", "INGEST_SHARE_GROUP": ""})
    assert s.migrate is False
    assert s.share_group is None


def test_mqtt_endpoint() -> None:
    e = MqttEndpoint.parse("mqtts://u%40x:p%3Aw@broker.example:8884")
    assert (e.host, e.port, e.tls, e.username, e.password) == (
        "broker.example", 8884, True, "u@x", "p:w",
    )  # fmt: skip
    assert MqttEndpoint.parse("mqtt://h").port == 1883


def test_redaction_hides_passwords() -> None:
    assert redact_url("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert redact_url("mqtt://h:1883") == "mqtt://h:1883"
    assert "s3cret" not in str(Settings(database_url="postgresql://bob:s3cret@db/x").redacted())


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(initial=0.1, maximum=2.0)
    delays = [b.next_delay() for _ in range(50)]
    assert all(0.01 <= d <= 2.0 for d in delays)
    assert max(delays[10:]) > 1.0  # grew towards the cap
    assert len(set(delays)) > 40  # jittered
    b.reset()
    assert b.next_delay() <= 0.1


def test_limit_and_credential_defaults() -> None:
    s = Settings()
    assert s.metrics_host == "127.0.0.1"
    assert s.max_payload_bytes == 1048576
    assert s.max_readings_per_message == 10000
    assert s.max_text_bytes == 1024
    assert s.max_ts_ahead == timedelta(days=1)
    assert s.min_ts == datetime(2000, 1, 1, tzinfo=UTC)
    assert s.dead_letter_retention == timedelta(days=30)
    assert s.mqtt_username is s.mqtt_password is s.mqtt_ca_file is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("36h", timedelta(hours=36)),
        ("1d", timedelta(days=1)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("600", timedelta(seconds=600)),
        (" 2W ", timedelta(weeks=2)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert load_settings(environ={"INGEST_MAX_TS_AHEAD": text}).max_ts_ahead == expected


def test_dead_letter_retention_forever_and_min_ts_in_utc() -> None:
    s = load_settings(
        environ={
            "INGEST_DEAD_LETTER_RETENTION": "forever",
            "INGEST_MIN_TS": "2010-01-01T02:00:00+02:00",
        }
    )
    assert s.dead_letter_retention is None
    assert s.min_ts == datetime(2010, 1, 1, tzinfo=UTC)
    assert s.min_ts.tzinfo is UTC


def test_toml_takes_typed_durations_and_times(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text(
        "max_ts_ahead = 90\nmin_ts = 2001-02-03T04:05:06Z\ndead_letter_retention = '7d'\n"
    )
    s = load_settings(environ={}, config_file=cfg)
    assert s.max_ts_ahead == timedelta(seconds=90)
    assert s.min_ts == datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert s.dead_letter_retention == timedelta(days=7)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"INGEST_MAX_TS_AHEAD": "-1h"}, "INGEST_MAX_TS_AHEAD"),
        ({"INGEST_MAX_TS_AHEAD": "forever"}, "INGEST_MAX_TS_AHEAD"),
        ({"INGEST_MAX_TS_AHEAD": "1y"}, "INGEST_MAX_TS_AHEAD"),
        ({"INGEST_MIN_TS": "2000-01-01T00:00:00"}, "INGEST_MIN_TS"),
        ({"INGEST_MIN_TS": "yesterday"}, "INGEST_MIN_TS"),
        ({"INGEST_DEAD_LETTER_RETENTION": "0s"}, "INGEST_DEAD_LETTER_RETENTION"),
        ({"INGEST_MAX_PAYLOAD_BYTES": "0"}, "INGEST_MAX_PAYLOAD_BYTES"),
        ({"INGEST_MAX_READINGS_PER_MESSAGE": "-5"}, "INGEST_MAX_READINGS_PER_MESSAGE"),
        ({"INGEST_MAX_TEXT_BYTES": "1k"}, "INGEST_MAX_TEXT_BYTES"),
        ({"INGEST_MQTT_KEY_FILE": "k.pem"}, "INGEST_MQTT_KEY_FILE"),
        (
            {"INGEST_MQTT_URL": "mqtt://h", "INGEST_MQTT_CA_FILE": "ca.pem"},
            "INGEST_MQTT_CA_FILE",
        ),
        ({"INGEST_MQTT_PASSWORD": "pw"}, "INGEST_MQTT_PASSWORD"),
    ],
)
def test_invalid_limits_and_credentials_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert info.value.setting == named


def test_secrets_never_shown() -> None:
    s = load_settings(
        environ={
            "INGEST_MQTT_URL": "mqtts://broker",
            "INGEST_MQTT_USERNAME": "ingest",
            "INGEST_MQTT_PASSWORD": "hunter2-pw",
            "INGEST_MQTT_CERT_FILE": "c.pem",
            "INGEST_MQTT_KEY_FILE": "k.pem",
            "INGEST_MQTT_KEY_PASSWORD": "key-secret",
        }
    )
    shown = str(s.redacted())
    assert "hunter2-pw" not in shown and "key-secret" not in shown
    assert s.redacted()["mqtt_password"] == "***"
    assert s.redacted()["mqtt_username"] == "ingest"
    assert s.redacted()["max_ts_ahead"] == "1d"
    assert s.redacted()["min_ts"] == "2000-01-01T00:00:00Z"
    json.dumps(s.redacted())  # loggable as it is


def test_to_environ_loads_back_to_the_same_settings() -> None:
    s = load_settings(
        environ={
            "INGEST_DEAD_LETTER_RETENTION": "forever",
            "INGEST_MAX_TS_AHEAD": "36h",
            "INGEST_MIN_TS": "2010-01-01T00:00:00Z",
            "INGEST_MIGRATE": "false",
            "INGEST_BATCH_MAX_DELAY": "0.5",
        }
    )
    assert load_settings(environ=s.to_environ()) == s
    assert load_settings(environ=Settings().to_environ()) == Settings(
        client_id=Settings().client_id
    )


def test_every_setting_reads_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt_password"
    secret.write_text("pa ss\n")  # as `echo "pa ss" > file` writes it
    rows = tmp_path / "rows"
    rows.write_text("250")
    s = load_settings(
        environ={
            "INGEST_MQTT_USERNAME": "ingest",
            "INGEST_MQTT_PASSWORD_FILE": str(secret),
            "INGEST_BATCH_MAX_ROWS_FILE": str(rows),
        }
    )
    assert s.mqtt_password == "pa ss"
    assert s.batch_max_rows == 250


def test_value_and_file_both_set_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    with pytest.raises(ConfigError) as info:
        load_settings(
            environ={"INGEST_MQTT_PASSWORD": "y", "INGEST_MQTT_PASSWORD_FILE": str(secret)}
        )
    assert "INGEST_MQTT_PASSWORD and INGEST_MQTT_PASSWORD_FILE" in str(info.value)


def test_unreadable_file_names_the_variable_not_the_content(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"INGEST_MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
    assert info.value.setting == "INGEST_MQTT_PASSWORD_FILE"
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfehunter2")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"INGEST_DATABASE_URL_FILE": str(binary)})
    assert info.value.setting == "INGEST_DATABASE_URL_FILE"
    assert "hunter2" not in str(info.value)


def test_a_bad_value_in_a_file_is_not_quoted(tmp_path: Path) -> None:
    bad = tmp_path / "rows"
    bad.write_text("s3cret-looking\n")
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"INGEST_BATCH_MAX_ROWS_FILE": str(bad)})
    assert info.value.setting == "INGEST_BATCH_MAX_ROWS_FILE"
    assert "s3cret" not in str(info.value)


def test_a_bad_secret_is_never_quoted(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text('[ingest]\nmqtt_password = ["hunter2"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(environ={}, config_file=cfg)
    assert "hunter2" not in str(info.value)


def test_worker_environ_replaces_files_by_resolved_values(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    parent = {
        "PATH": "/bin",
        "INGEST_MQTT_USERNAME": "ingest",
        "INGEST_MQTT_PASSWORD_FILE": str(secret),
        "INGEST_SHARE_GROUP": "g",
    }
    s = load_settings(environ=parent, overrides={"share_group": None, "batch_max_rows": "7"})
    child = worker_environ(s, parent)
    assert child["PATH"] == "/bin"
    assert "INGEST_MQTT_PASSWORD_FILE" not in child
    assert load_settings(environ=child) == s


def test_routes_tables_are_not_settings(tmp_path: Path) -> None:
    """[[routes]] is read by its own loader; the settings loader leaves it alone."""
    top = tmp_path / "top.toml"
    top.write_text('batch_max_rows = 9\n[[routes]]\ntopic = "a/{device_id}"\nformat = "json"\n')
    assert load_settings(environ={}, config_file=top).batch_max_rows == 9
    nested = tmp_path / "nested.toml"
    nested.write_text('[ingest]\nbatch_max_rows = 8\n[[routes]]\ntopic = "a/{device_id}"\n')
    assert load_settings(environ={}, config_file=nested).batch_max_rows == 8


def test_a_setting_outside_the_ingest_table_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("batch_max_rows = 9\n[ingest]\nbatch_max_delay = 0.1\n")
    with pytest.raises(ConfigError, match="batch_max_rows"):
        load_settings(environ={}, config_file=cfg)


def test_repr_hides_secrets() -> None:
    s = Settings(
        database_url="postgresql://ingest:Db5ecret@db/x",
        mqtt_url="mqtt://broker",
        mqtt_username="u",
        mqtt_password="Mq5ecret",
    )
    shown = repr(s)
    assert "Db5ecret" not in shown and "Mq5ecret" not in shown
    assert "mqtt_username='u'" in shown
