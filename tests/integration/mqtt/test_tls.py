"""mqtts:// with mutual TLS against a real Mosquitto: the simulator publishes, the daemon
(``ingest run``) ingests, each with a CA, a client certificate and key made by ``openssl`` for
this test (ingest/devservers/tls.py). With a CA that did not sign the broker's certificate,
nothing is delivered and the log says why.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ingest.devservers.brokers import Broker, Listener
from ingest.devservers.throwaway import MosquittoFactory
from ingest.devservers.tls import TlsFiles, make_tls_files
from simulators._errors import ConfigError
from simulators._mqtt import tls_context
from tests.integration.support import Daemon, scalar, unique_topic, wait_until

DEVICES, COUNT = 3, 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Another CA (and its certificates): it signed nothing the broker has."""
    return make_tls_files(tmp_path_factory.mktemp("stranger"))


def tls_broker(factory: MosquittoFactory, pki: TlsFiles) -> tuple[Broker, str]:
    """A broker whose second listener speaks TLS and wants a client certificate from our CA."""
    broker = factory(
        listeners=[
            Listener(
                cafile=pki.ca,
                certfile=pki.server_cert,
                keyfile=pki.server_key,
                require_certificate=True,
            )
        ]
    )
    return broker, f"mqtts://127.0.0.1:{broker.ports[1]}"


def tls_env(ca: Path, cert: Path, key: Path) -> dict[str, str]:
    return {
        "INGEST_MQTT_CA_FILE": str(ca),
        "INGEST_MQTT_CERT_FILE": str(cert),
        "INGEST_MQTT_KEY_FILE": str(key),
    }


def simulate(url: str, topic: str, *flags: str) -> tuple[int, dict[str, Any] | None, str]:
    """``simulate`` as a process: exit status, its JSON report (None when it printed none),
    stderr."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "simulators", "--mqtt-url", url, "--topic", topic,
            "--devices", str(DEVICES), "--count", str(COUNT), "--rate", "50", "--qos", "1",
            "--seed", "7", "--report", "json", "--quiet", *flags,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, proc.stderr


def client_flags(ca: Path, cert: Path, key: Path) -> Sequence[str]:
    return ["--ca-file", str(ca), "--cert-file", str(cert), "--key-file", str(key)]


def samples_stored(database_url: str) -> int:
    """(device, ts) pairs stored: each simulated message is one sample with a unique ts."""
    return int(scalar(database_url, "SELECT count(DISTINCT (device_id, ts)) FROM readings") or 0)


def test_mutual_tls_simulator_to_daemon_data_lands(
    pki: TlsFiles, mosquitto_factory: MosquittoFactory, database_url: str
) -> None:
    _broker, url = tls_broker(mosquitto_factory, pki)
    topic = unique_topic()
    env = tls_env(pki.ca, pki.client_cert, pki.client_key)
    with Daemon(database_url=database_url, mqtt_url=url, topic=topic, extra_env=env) as daemon:
        daemon.wait_subscribed(60)
        code, report, err = simulate(
            url, topic, *client_flags(pki.ca, pki.client_cert, pki.client_key)
        )
        assert code == 0, err
        assert report is not None and report["published"] == DEVICES * COUNT
        assert report["failed"] == 0
        wait_until(lambda: samples_stored(database_url) == DEVICES * COUNT, 60, what="samples")
        assert daemon.stop() == 0
    assert "certificate verify failed" not in daemon.log_text()


def test_a_ca_that_did_not_sign_the_broker_delivers_nothing_and_says_why(
    pki: TlsFiles, stranger: TlsFiles, mosquitto_factory: MosquittoFactory, database_url: str
) -> None:
    _broker, url = tls_broker(mosquitto_factory, pki)
    topic = unique_topic()
    # The daemon trusts only a stranger's CA (its client certificate is a valid one).
    env = tls_env(stranger.ca, pki.client_cert, pki.client_key)
    with Daemon(database_url=database_url, mqtt_url=url, topic=topic, extra_env=env) as daemon:
        daemon.wait_for_log("certificate verify failed", 60)
        # The simulator with the same wrong CA cannot connect either: exit 1, the cause named.
        code, report, err = simulate(
            url, topic, *client_flags(stranger.ca, pki.client_cert, pki.client_key)
        )
        assert code == 1 and report is None
        assert "certificate verify failed" in err and err.count("\n") == 1
        # With the right CA it publishes; the daemon still cannot connect, so nothing lands.
        code, report, err = simulate(
            url, topic, *client_flags(pki.ca, pki.client_cert, pki.client_key)
        )
        assert code == 0 and report is not None and report["published"] == DEVICES * COUNT, err
        failures = daemon.log_text().count("certificate verify failed")
        wait_until(
            lambda: daemon.log_text().count("certificate verify failed") > failures,
            60,
            what="another failed attempt after the publish",
        )
        assert daemon.proc is not None and daemon.proc.poll() is None  # retried, not dead
        assert "subscribed to" not in daemon.log_text()
        assert samples_stored(database_url) == 0


def test_the_broker_refuses_a_simulator_without_a_client_certificate(
    pki: TlsFiles, mosquitto_factory: MosquittoFactory
) -> None:
    _broker, url = tls_broker(mosquitto_factory, pki)
    code, report, err = simulate(url, unique_topic(), "--ca-file", str(pki.ca))
    assert code == 1 and report is None
    assert err.startswith("simulate: error: cannot connect to mqtts://127.0.0.1:")
    assert err.count("\n") == 1


def test_the_simulators_tls_context_verifies_and_checks_its_files(
    pki: TlsFiles, stranger: TlsFiles, tmp_path: Path
) -> None:
    context = tls_context(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # Only the given CA is trusted, not the system's store on top of it.
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "iot-ingest throwaway CA"),),)
    ]
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pki.client_key), "-aes256", "-passout", "pass:x",
         "-out", str(encrypted)],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:  # never a prompt on the terminal
        tls_context(str(pki.ca), str(pki.client_cert), str(encrypted))
    assert info.value.setting == "--key-file" and "encrypted" in info.value.message
    with pytest.raises(ConfigError) as info:  # a key that is not the certificate's
        tls_context(str(pki.ca), str(pki.client_cert), str(stranger.client_key))
    assert info.value.setting == "--cert-file"
    with pytest.raises(ConfigError) as info:
        tls_context(str(pki.client_key), None, None)  # a key where the CA should be
    assert info.value.setting == "--ca-file"


def test_simulate_names_an_unreadable_tls_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / f"{uuid.uuid4().hex}.pem"
    code, report, err = simulate("mqtts://127.0.0.1:1", "t/{device_id}", "--ca-file", str(missing))
    assert code == 2 and report is None
    assert err == f"simulate: error: --ca-file: cannot read {missing}: No such file or directory\n"


@pytest.mark.parametrize("variable", ["INGEST_MQTT_CA_FILE", "INGEST_MQTT_CERT_FILE"])
def test_the_daemon_names_an_unreadable_tls_file_and_exits_2(
    variable: str, pki: TlsFiles, database_url: str, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    env = {**tls_env(pki.ca, pki.client_cert, pki.client_key), variable: str(missing)}
    daemon = Daemon(
        database_url=database_url,
        mqtt_url="mqtts://127.0.0.1:1",
        topic=unique_topic(),
        extra_env=env,
    )
    with daemon:
        assert daemon.wait(60) == 2
    last = daemon.log_text().strip().splitlines()[-1]
    assert last.startswith(f"ingest: configuration error: {variable}: "), daemon.log_text()
    assert str(missing) in last and "Traceback" not in daemon.log_text()


def certificate_for_another_host(pki: TlsFiles, directory: Path) -> tuple[Path, Path]:
    """A server certificate signed by our CA for a name that is not 127.0.0.1."""
    key, csr, cert, ext = (directory / f"elsewhere.{x}" for x in ("key", "csr", "crt", "ext"))
    ext.write_text("subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n")
    for args in (
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(csr), "-subj", "/CN=elsewhere.invalid"],
        ["x509", "-req", "-in", str(csr), "-CA", str(pki.ca), "-CAkey", str(pki.ca.parent / "ca.key"),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ):  # fmt: skip
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    return cert, key


def test_a_certificate_for_another_host_is_refused_even_from_the_right_ca(
    pki: TlsFiles, mosquitto_factory: MosquittoFactory, database_url: str, tmp_path: Path
) -> None:
    cert, key = certificate_for_another_host(pki, tmp_path)
    broker = mosquitto_factory(listeners=[Listener(certfile=cert, keyfile=key)])
    url = f"mqtts://127.0.0.1:{broker.ports[1]}"
    code, report, err = simulate(url, unique_topic(), "--ca-file", str(pki.ca))
    assert code == 1 and report is None
    assert "certificate verify failed" in err and "mismatch" in err.lower()
    env = {"INGEST_MQTT_CA_FILE": str(pki.ca)}
    with Daemon(
        database_url=database_url, mqtt_url=url, topic=unique_topic(), extra_env=env
    ) as daemon:
        daemon.wait_for_log("certificate verify failed", 60)
        assert "subscribed to" not in daemon.log_text()
