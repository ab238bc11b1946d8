"""Several brokers: the list in INGEST_MQTT_URL or ``[[brokers]]``, one Settings per broker, the
client ids and metrics labels of their worker sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.errors import ConfigError
from ingest.observability.merge import merge_expositions
from ingest.runtime.supervisor import Supervisor, worker_client_id
from ingest.settings import Settings, load_settings
from ingest.urls import UrlError, broker_name, redact_url, split_mqtt_urls

A = "mqtt://127.0.0.1:1883"
B = "mqtt://127.0.0.1:1884"


def _config_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# -- urls --------------------------------------------------------------------------------------


def test_split_keeps_a_comma_inside_a_password() -> None:
    assert split_mqtt_urls(f"{A}, mqtts://u:p,w@b.example") == [A, "mqtts://u:p,w@b.example"]
    assert split_mqtt_urls("mqtt://u:p,w@b.example") == ["mqtt://u:p,w@b.example"]
    with pytest.raises(UrlError, match="stray"):
        split_mqtt_urls(f"{A},")


def test_broker_name_has_no_user_info() -> None:
    assert broker_name("mqtt://user:s3cret@Broker.Example:1884") == "mqtt://broker.example:1884"
    assert broker_name("mqtts://[::1]") == "mqtts://[::1]:8883"


def test_a_list_is_redacted_url_by_url() -> None:
    shown = redact_url("mqtt://u:s3cret@a:1,mqtt://v:0ther@b:2")
    assert shown == "mqtt://u:***@a:1,mqtt://v:***@b:2"


# -- settings ----------------------------------------------------------------------------------


def test_one_url_is_exactly_as_before() -> None:
    s = load_settings(environ={"INGEST_MQTT_URL": A})
    assert not s.lists_brokers
    assert s.broker_settings() == (s,)
    assert s.mqtt_endpoint().port == 1883


def test_a_comma_separated_list_gives_one_settings_per_broker() -> None:
    env = {"INGEST_MQTT_URL": f"mqtt://u:p@127.0.0.1:1883, {B}", "INGEST_MQTT_USERNAME": "ops"}
    s = load_settings(environ=env)
    first, second = s.broker_settings()
    assert (first.mqtt_url, second.mqtt_url) == ("mqtt://u:p@127.0.0.1:1883", B)
    assert first.mqtt_username == second.mqtt_username == "ops"  # the global setting, each
    assert [b.mqtt_endpoint().name() for b in (first, second)] == [A, B]
    assert not first.lists_brokers and first.brokers is None
    with pytest.raises(ConfigError, match="broker_settings"):
        s.mqtt_endpoint()  # a list has no single endpoint: nothing may pick one silently


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (f"{A},{A}", "INGEST_MQTT_URL[1]: mqtt://127.0.0.1:1883 is listed twice"),
        # The same broker with other credentials is still the same broker.
        (f"mqtt://u:s3cret@127.0.0.1:1883,{A}", "listed twice (also INGEST_MQTT_URL[0])"),
        (f"{A},mqtt://127.0.0.1:99999", "INGEST_MQTT_URL[1]: the port"),
        (f"{A},", "INGEST_MQTT_URL: an empty broker"),
    ],
)
def test_a_bad_list_is_one_line_naming_the_broker_without_its_password(
    url: str, named: str
) -> None:
    message = _config_error(environ={"INGEST_MQTT_URL": url})
    assert named in message
    assert "s3cret" not in message and "\n" not in message


def test_tls_files_beside_a_plaintext_broker_of_the_list_are_refused() -> None:
    env = {"INGEST_MQTT_URL": f"{A},{B}", "INGEST_MQTT_CA_FILE": "/ca.pem"}
    assert "INGEST_MQTT_CA_FILE for INGEST_MQTT_URL[0]" in _config_error(environ=env)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(text)
    return path


def test_brokers_tables_with_their_own_credentials(tmp_path: Path) -> None:
    cfg = _toml(
        tmp_path,
        '[ingest]\nclient_id = "x"\nmqtt_username = "everyone"\n'
        f'[[brokers]]\nurl = "{A}"\nusername = "bob"\npassword = "s3cret"\n'
        '[[brokers]]\nurl = "mqtts://b.example"\nca_file = "/b-ca.pem"\n'
        'cert_file = "/b.pem"\nkey_file = "/b.key"\n',
    )
    s = load_settings(environ={}, config_file=cfg)
    assert "s3cret" not in repr(s)
    first, second = s.broker_settings()
    assert (first.mqtt_username, first.mqtt_password, first.mqtt_ca_file) == ("bob", "s3cret", None)
    assert (second.mqtt_username, second.mqtt_ca_file) == ("everyone", "/b-ca.pem")
    assert (second.mqtt_cert_file, second.mqtt_key_file) == ("/b.pem", "/b.key")
    assert second.mqtt_endpoint().name() == "mqtts://b.example:8883"
    # What a worker is given loads back to its broker's settings, without the list.
    env = first.to_environ()
    assert "INGEST_BROKERS" not in env
    assert load_settings(environ=env).broker_settings() == (first,)


def test_one_brokers_table_is_one_broker(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, f'[[brokers]]\nurl = "{B}"\n')
    (only,) = load_settings(environ={}, config_file=cfg).broker_settings()
    assert only.mqtt_url == B and only.brokers is None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (f'[[brokers]]\nurl = "{A}"\nbogus = 1\n', "brokers[0]: unknown key 'bogus'"),
        ('[[brokers]]\nusername = "x"\n', "brokers[0]: url: missing"),
        (f'[[brokers]]\nurl = "{A}"\n[[brokers]]\nurl = "{A}"\n', "brokers[1]: mqtt://"),
        (f'[[brokers]]\nurl = "{A}"\nport = 3\n', "unknown key 'port'"),
        (f'[[brokers]]\nurl = "{A}"\nca_file = "/x"\n', "brokers[0].ca_file: is set but"),
        ('[[brokers]]\nurl = "mqtt://u:s3cret@h/p"\n', "brokers[0].url: a broker URL has no path"),
        (f'[[brokers]]\nurl = "{A}"\npassword = "s3cret"\n', "brokers[0].password: needs"),
        (f'[[brokers]]\nurl = "{A}"\nusername = 7\n', "brokers[0].username: must be a string"),
    ],
)
def test_a_bad_brokers_table_names_it(tmp_path: Path, text: str, named: str) -> None:
    message = _config_error(environ={}, config_file=_toml(tmp_path, text))
    assert named in message
    assert "s3cret" not in message


def test_url_and_brokers_tables_together_are_an_error(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, f'[[brokers]]\nurl = "{A}"\n')
    message = _config_error(environ={"INGEST_MQTT_URL": B}, config_file=cfg)
    assert message.startswith("INGEST_MQTT_URL and [[brokers]]: both set")
    with pytest.raises(ConfigError, match="INGEST_MQTT_URL and \\[\\[brokers\\]\\]"):
        Settings(mqtt_url=B, brokers=json.dumps([{"url": A}]))


def test_brokers_as_json_in_the_environment_is_not_echoed() -> None:
    message = _config_error(environ={"INGEST_BROKERS": '[{"url": "mqtt://u:s3cret@a"'})
    assert message == "INGEST_BROKERS: not JSON"


# -- worker sets -------------------------------------------------------------------------------


def test_client_ids_of_the_worker_sets() -> None:
    assert worker_client_id("ingest-h", 3) == "ingest-h-3"
    assert worker_client_id("ingest-h", 0, broker=1) == "ingest-h-b1-0"


def test_a_worker_set_per_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INGEST_MQTT_URL", raising=False)
    s = load_settings(
        environ={"INGEST_MQTT_URL": f"{A},mqtt://u:s3cret@127.0.0.1:1884", "INGEST_WORKERS": "2"},
        overrides={"client_id": "c", "metrics_port": "0"},
    )
    sup = Supervisor(s)
    found = [
        (
            w.label,
            w.broker,
            w.env["INGEST_CLIENT_ID"],
            w.env["INGEST_MQTT_URL"],
            w.env["INGEST_SHARE_GROUP"],
        )
        for w in sup.workers
    ]
    assert found == [
        ("b0-0", A, "c-b0-0", A, "c"),
        ("b0-1", A, "c-b0-1", A, "c"),
        ("b1-0", B, "c-b1-0", "mqtt://u:s3cret@127.0.0.1:1884", "c"),
        ("b1-1", B, "c-b1-1", "mqtt://u:s3cret@127.0.0.1:1884", "c"),
    ]
    # Each worker is a plain one-broker daemon.
    for w in sup.workers:
        assert load_settings(environ=w.env).broker_settings()[0].worker_id == w.label


def test_one_broker_keeps_its_worker_ids() -> None:
    s = load_settings(environ={"INGEST_MQTT_URL": A, "INGEST_WORKERS": "2"},
                      overrides={"client_id": "c", "metrics_port": "0"})  # fmt: skip
    sup = Supervisor(s)
    assert [(w.label, w.broker, w.env["INGEST_CLIENT_ID"]) for w in sup.workers] == [
        ("0", None, "c-0"),
        ("1", None, "c-1"),
    ]


def test_per_broker_families_get_the_broker_label() -> None:
    text = (
        "# HELP ingest_messages_received_total Received.\n"
        "# TYPE ingest_messages_received_total counter\n"
        'ingest_messages_received_total{{worker="{w}"}} 5.0\n'
        "# TYPE ingest_broker_subscribed gauge\n"
        'ingest_broker_subscribed{{worker="{w}"}} 1.0\n'
        "# TYPE ingest_database_connected gauge\n"
        'ingest_database_connected{{worker="{w}"}} 1.0\n'
    )
    merged = merge_expositions(
        [text.format(w="b0-0"), text.format(w="b1-0")], brokers=[A, B]
    ).decode()
    assert f'ingest_messages_received_total{{broker="{A}",worker="b0-0"}} 5.0' in merged
    assert f'ingest_broker_subscribed{{broker="{B}",worker="b1-0"}} 1.0' in merged
    assert 'ingest_database_connected{worker="b1-0"} 1.0' in merged  # not about a broker
    assert merged.count("# TYPE ingest_messages_received_total counter") == 1


def test_each_worker_set_gets_its_brokers_own_credentials(tmp_path: Path) -> None:
    cfg = _toml(
        tmp_path,
        f'[ingest]\nclient_id = "c"\nmetrics_port = 0\n[[brokers]]\nurl = "{A}"\n'
        f'[[brokers]]\nurl = "{B}"\nusername = "bob"\npassword = "s3cret"\n',
    )
    sup = Supervisor(load_settings(environ={}, config_file=cfg))
    first, second = (w.env for w in sup.workers)
    assert "INGEST_MQTT_PASSWORD" not in first and "INGEST_BROKERS" not in first
    assert (second["INGEST_MQTT_USERNAME"], second["INGEST_MQTT_PASSWORD"]) == ("bob", "s3cret")
    assert (first["INGEST_MQTT_URL"], second["INGEST_MQTT_URL"]) == (A, B)
