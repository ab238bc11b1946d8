"""The broker connection's TLS context and credentials (ingest.mqtt.tls): always verified, a
file that cannot be used named by its setting, an encrypted key never a terminal prompt."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from ingest.devservers.tls import TlsFiles, make_tls_files
from ingest.errors import ConfigError
from ingest.mqtt.tls import credentials, tls_context
from ingest.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

KEY_PASSWORD = "k3y-Passw0rd"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def encrypted_key(files: TlsFiles) -> Path:
    out = files.client_key.with_name("client-encrypted.key")
    subprocess.run(
        ["openssl", "pkey", "-in", str(files.client_key), "-aes256", "-passout",
         f"pass:{KEY_PASSWORD}", "-out", str(out)],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return out


def settings(**values: object) -> Settings:
    return Settings(**{"mqtt_url": "mqtts://127.0.0.1:8883", **values})  # type: ignore[arg-type]


def test_plaintext_has_no_context() -> None:
    assert tls_context(Settings(mqtt_url="mqtt://127.0.0.1:1883")) is None


def test_mqtts_always_verifies_against_the_system_trust_store_by_default() -> None:
    context = tls_context(settings())
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_ca_file_is_what_verifies_the_broker(files: TlsFiles) -> None:
    context = tls_context(settings(mqtt_ca_file=str(files.ca)))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1  # that CA only, not the system's as well


def test_client_certificate_and_key(files: TlsFiles) -> None:
    context = tls_context(
        settings(
            mqtt_ca_file=str(files.ca),
            mqtt_cert_file=str(files.client_cert),
            mqtt_key_file=str(files.client_key),
        )
    )
    assert context is not None


@pytest.mark.parametrize(
    ("name", "setting"),
    [("mqtt_ca_file", "INGEST_MQTT_CA_FILE"), ("mqtt_cert_file", "INGEST_MQTT_CERT_FILE")],
)
def test_a_missing_file_is_named_by_its_setting(
    tmp_path: Path, files: TlsFiles, name: str, setting: str
) -> None:
    values = {"mqtt_ca_file": str(files.ca), "mqtt_cert_file": str(files.client_cert)}
    values["mqtt_key_file"] = str(files.client_key)
    values[name] = str(tmp_path / "absent.pem")
    with pytest.raises(ConfigError) as caught:
        tls_context(settings(**values))
    assert caught.value.setting == setting
    assert "absent.pem" in str(caught.value)


def test_a_missing_key_file_is_named(tmp_path: Path, files: TlsFiles) -> None:
    with pytest.raises(ConfigError) as caught:
        tls_context(
            settings(mqtt_cert_file=str(files.client_cert), mqtt_key_file=str(tmp_path / "no.key"))
        )
    assert caught.value.setting == "INGEST_MQTT_KEY_FILE"


def test_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        tls_context(settings(mqtt_ca_file=str(junk)))
    assert caught.value.setting == "INGEST_MQTT_CA_FILE"


def test_an_encrypted_key_without_its_password_is_a_config_error(
    files: TlsFiles, encrypted_key: Path
) -> None:
    # OpenSSL would prompt on the terminal (and hang a daemon) if asked without a callback.
    with pytest.raises(ConfigError) as caught:
        tls_context(
            settings(mqtt_cert_file=str(files.client_cert), mqtt_key_file=str(encrypted_key))
        )
    assert caught.value.setting == "INGEST_MQTT_KEY_PASSWORD"
    assert "encrypted" in str(caught.value)


def test_an_encrypted_key_with_its_password(files: TlsFiles, encrypted_key: Path) -> None:
    context = tls_context(
        settings(
            mqtt_cert_file=str(files.client_cert),
            mqtt_key_file=str(encrypted_key),
            mqtt_key_password=KEY_PASSWORD,
        )
    )
    assert context is not None


def test_a_wrong_key_password_is_named_and_not_shown(files: TlsFiles, encrypted_key: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        tls_context(
            settings(
                mqtt_cert_file=str(files.client_cert),
                mqtt_key_file=str(encrypted_key),
                mqtt_key_password="wrong-Secret",
            )
        )
    assert caught.value.setting == "INGEST_MQTT_KEY_PASSWORD"
    assert "wrong-Secret" not in str(caught.value)


def test_explicit_credentials_win_over_the_url() -> None:
    url = "mqtt://urluser:urlpass@127.0.0.1:1883"

    def login(**values: str) -> tuple[str | None, str | None]:
        found = credentials(Settings(**values))  # type: ignore[arg-type]
        return found.username, found.password

    assert login(mqtt_url=url) == ("urluser", "urlpass")
    assert login(mqtt_url=url, mqtt_username="u", mqtt_password="p") == ("u", "p")
    assert login(mqtt_url=url, mqtt_password="p") == ("urluser", "p")
    assert login(mqtt_url="mqtt://127.0.0.1:1883") == (None, None)
    assert "urlpass" not in repr(credentials(Settings(mqtt_url=url)))
