"""One URL parser and redactor (ingest/urls.py) for the daemon and the simulator."""

from __future__ import annotations

import pytest

from ingest.errors import ConfigError
from ingest.settings import Settings
from ingest.urls import MqttEndpoint, UrlError, check_database_url, parse_mqtt_url, redact_url
from simulators._config import parse_mqtt_url as simulator_parse
from simulators._errors import ConfigError as SimulatorConfigError

SECRET = "Sup3rSecret"

# Passwords a person may paste into a URL without percent-encoding them. Each shape moves part
# of the password somewhere else (host, port, path, query, fragment) if read leniently.
MALFORMED_PASSWORDS = [
    f"{SECRET}/x",
    f"x/{SECRET}",
    f"/{SECRET}",
    f"{SECRET}?x",
    f"x?{SECRET}=1",
    f"{SECRET}#x",
    f"x#{SECRET}",
    f"{SECRET}@x",
    f"x@{SECRET}",
    f"{SECRET}[",
    f"[{SECRET}]",
    f"{SECRET}]x",
    f"{SECRET}\nx",
    f"{SECRET}\tx",
]


def mqtt_urls(password: str) -> list[str]:
    return [
        f"mqtt://ingest:{password}@127.0.0.1:1883",
        f"mqtts://ingest:{password}@broker.example",
        f"mqtt://ingest:{password}@[::1]:1883/",
    ]


def database_urls(password: str) -> list[str]:
    return [
        f"postgresql://ingest:{password}@db:5432/ingest",
        f"postgres://ingest:{password}@db/ingest?sslmode=verify-full",
        f"postgresql://ingest:{password}@h1:5432,h2:5433/ingest",
    ]


BROKER_CASES = [
    ("mqtt://localhost", MqttEndpoint("localhost", 1883, False)),
    ("mqtt://localhost/", MqttEndpoint("localhost", 1883, False)),
    ("mqtt://LocalHost:", MqttEndpoint("localhost", 1883, False)),
    ("mqtts://broker.example", MqttEndpoint("broker.example", 8883, True)),
    ("mqtts://broker.example:8884", MqttEndpoint("broker.example", 8884, True)),
    ("mqtt://[::1]:1999", MqttEndpoint("::1", 1999, False)),
    ("mqtt://u@h", MqttEndpoint("h", 1883, False, "u")),
    ("mqtt://u:@h", MqttEndpoint("h", 1883, False, "u", "")),
    ("mqtt://us%40er:p%3As%2Fs%40%23%3F@h:1", MqttEndpoint("h", 1, False, "us@er", "p:s/s@#?")),
    ("mqtt://u:pa:ss@h:65535", MqttEndpoint("h", 65535, False, "u", "pa:ss")),
    ("mqtt://u:pa ss@h", MqttEndpoint("h", 1883, False, "u", "pa ss")),
    ("  mqtt://h:1884\n", MqttEndpoint("h", 1884, False)),
]


@pytest.mark.parametrize(("url", "expected"), BROKER_CASES)
def test_broker_urls_parse_the_same_for_daemon_and_simulator(
    url: str, expected: MqttEndpoint
) -> None:
    assert parse_mqtt_url(url) == expected
    assert MqttEndpoint.parse(url) == expected
    assert simulator_parse(url) == expected
    assert Settings(mqtt_url=url).mqtt_endpoint() == expected


BAD_BROKER_URLS = [
    "",
    "localhost:1883",
    "localhost",
    "http://localhost",
    "tcp://localhost:1883",
    "mqtt://",
    "mqtt://:1883",
    "mqtt://h:0",
    "mqtt://h:65536",
    "mqtt://h:99999",
    "mqtt://h:-1",
    "mqtt://h:12ab",
    "mqtt://h:\uff11\uff12",  # full-width digits
    "mqtt://h/path",
    "mqtt://h//",
    "mqtt://h?x=1",
    "mqtt://h#frag",
    "mqtt://h1,h2",
    "mqtt://h:1:2",
    "mqtt://::1",
    "mqtt://[::1",
    "mqtt://[nothost]:1883",
    "mqtt://[::1]x",
    "mqtt://h]",
    "mqtt://:pw@h",
    "mqtt://h o st",
    "mqtt://h\x7f",
    *[url for password in MALFORMED_PASSWORDS for url in mqtt_urls(password)],
]


@pytest.mark.parametrize("url", BAD_BROKER_URLS)
def test_malformed_broker_urls_are_configuration_errors_that_quote_nothing(url: str) -> None:
    with pytest.raises(UrlError) as info:
        parse_mqtt_url(url)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as daemon:
        Settings(mqtt_url=url)
    assert daemon.value.setting == "INGEST_MQTT_URL"
    assert SECRET not in str(daemon.value) and "\n" not in str(daemon.value)
    with pytest.raises(SimulatorConfigError) as sim:
        simulator_parse(url, setting="--mqtt-url")
    assert str(sim.value).startswith("--mqtt-url: ")
    assert SECRET not in str(sim.value)


GOOD_DATABASE_URLS = [
    "postgresql://",
    "postgresql:///ingest",
    "postgresql://db/ingest",
    "postgres://ingest@db:5432/ingest",
    "postgresql://ingest:pw@db:5432/ingest",
    "postgresql://ingest:S%2Fp%40w%23%3F@db/ingest",
    "postgresql://ingest:pw@h1:5432,h2:5433,[::1]:5434/ingest?target_session_attrs=read-write",
    "postgresql:///ingest?host=/var/run/postgresql",
    "postgresql://%2Fvar%2Frun%2Fpostgresql/ingest",
    "postgresql://db/ingest?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=c&sslkey=k",
    "postgresql://db/ingest?user=admin@server",  # the e-mail-like user names some clouds use
]


@pytest.mark.parametrize("url", GOOD_DATABASE_URLS)
def test_database_urls_libpq_reads_are_accepted(url: str) -> None:
    check_database_url(url)
    assert Settings(database_url=url).database_url == url


BAD_DATABASE_URLS = [
    "ingest",
    "host=db dbname=ingest",
    "mysql://db/ingest",
    "postgresql://db:0/ingest",
    "postgresql://db:70000/ingest",
    "postgresql://h1:5432,h2:x/ingest",
    "postgresql://[::1/ingest",
    "postgresql://db/ingest#x",
    "postgresql://db/ingest?sslmode=require&x=a@b",
    *[url for password in MALFORMED_PASSWORDS for url in database_urls(password)],
]


@pytest.mark.parametrize("url", BAD_DATABASE_URLS)
def test_malformed_database_urls_are_configuration_errors_that_quote_nothing(url: str) -> None:
    with pytest.raises(UrlError) as info:
        check_database_url(url)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError) as daemon:
        Settings(database_url=url)
    assert daemon.value.setting == "INGEST_DATABASE_URL"
    assert SECRET not in str(daemon.value) and "\n" not in str(daemon.value)


REDACTED = [
    ("mqtt://h:1883", "mqtt://h:1883"),
    ("mqtt://u@h", "mqtt://u@h"),
    ("mqtt://u:pw@h:1883", "mqtt://u:***@h:1883"),
    ("mqtts://u%40x:p%3Aw@[::1]:1999/", "mqtts://u%40x:***@[::1]:1999/"),
    ("postgresql://bob:s3cret@db:5432/x", "postgresql://bob:***@db:5432/x"),
    (
        "postgresql://bob:pw@h1,h2:5433/x?sslmode=verify-full&password=pw&sslpassword=pw",
        "postgresql://bob:***@h1,h2:5433/x?sslmode=verify-full&password=***&sslpassword=***",
    ),
    ("postgresql:///x?password=pw", "postgresql:///x?password=***"),
    # Malformed: everything between :// and the last @ goes.
    ("postgresql://ingest:Sup3r/Secret+pw@db:5432/x", "postgresql://***@db:5432/x"),
    ("mqtt://u:a@b@h", "mqtt://***@h"),
    ("mqtt://u:p[w@h:1", "mqtt://***@h:1"),
    ("mqtt://u:secret", "mqtt://***"),
    ("mqtt://u:secret@h:99999?password=x", "mqtt://***@h:99999?password=***"),
    ("garbage", "<not a URL>"),
    ("u:secret@host", "<not a URL>"),
    ("", "<not a URL>"),
]


@pytest.mark.parametrize(("url", "expected"), REDACTED)
def test_redaction(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        *[u for p in [*MALFORMED_PASSWORDS, SECRET] for u in mqtt_urls(p) + database_urls(p)],
        f"postgresql://db/x?password={SECRET}",
        f"postgresql://db/x?sslpassword={SECRET}&sslmode=require",
        f"mqtt://u:{SECRET}",
        f"mqtt://u:{SECRET}@",
        f"mqtt://:{SECRET}@h",
        f"{SECRET}",
        f"x:{SECRET}@h",
    ],
)
def test_redaction_never_shows_the_password_whatever_the_shape(url: str) -> None:
    assert SECRET not in redact_url(url)


def test_endpoint_repr_and_redacted_form_hide_the_password() -> None:
    endpoint = parse_mqtt_url(f"mqtts://us%40er:{SECRET}@[::1]:1999")
    assert SECRET not in repr(endpoint)
    assert endpoint.redacted() == "mqtts://us%40er:***@[::1]:1999"
    assert parse_mqtt_url(endpoint.redacted()).username == "us@er"  # it reads back
    assert parse_mqtt_url("mqtt://h").redacted() == "mqtt://h:1883"
    assert parse_mqtt_url("mqtt://u@h").redacted() == "mqtt://u@h:1883"


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        (f"mqtt://ingest:{SECRET}@Broker.example", "mqtt://broker.example:1883"),
        ("mqtts://user@[::1]", "mqtts://[::1]:8883"),
    ],
)
def test_broker_name_has_no_user_info(url: str, name: str) -> None:
    from ingest.urls import broker_name

    assert broker_name(url) == name
    assert parse_mqtt_url(url).name() == name
