from __future__ import annotations

from pathlib import Path

import pytest

from ingest.backoff import Backoff
from ingest.errors import ConfigError
from ingest.settings import MqttEndpoint, Settings, load_settings, redact_url


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
