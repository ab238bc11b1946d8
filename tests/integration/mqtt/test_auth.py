"""Broker credentials and secrets, against real servers: a Mosquitto with ``allow_anonymous
false`` and a password file; the daemon given its credentials through
``INGEST_MQTT_USERNAME`` + ``INGEST_MQTT_PASSWORD_FILE``, the simulator through ``--username`` +
``--password-file``. A password never shows: not in a log line, not in an error, however
malformed the URL that holds it (``ingest run`` and ``simulate`` as processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from ingest.devservers.brokers import Broker
from ingest.devservers.throwaway import MosquittoFactory
from ingest.devservers.tls import mosquitto_password_file
from tests.integration.support import Daemon, scalar, unique_topic, wait_until

DEVICES, COUNT = 3, 20
SECRET = "Sup3rSecret"  # in every password below, so a leak of any of them is found
DAEMON_PASSWORD = f"daemon-{SECRET}"
DEVICE_PASSWORD = f"device-{SECRET}"


@pytest.fixture
def locked_broker(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> Broker:
    passwords = mosquitto_password_file(
        tmp_path / "passwd", {"ingest": DAEMON_PASSWORD, "device": DEVICE_PASSWORD}
    )
    return mosquitto_factory(password_file=passwords, allow_anonymous=False)


def secret_file(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")  # as secrets are mounted: one trailing newline
    path.chmod(0o600)
    return path


def simulate(
    *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | None, str]:
    """``simulate`` as a process: exit status, its JSON report (None when none), stderr."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "simulators", "--devices", str(DEVICES), "--count", str(COUNT),
            "--rate", "50", "--qos", "1", "--seed", "3", "--report", "json", "--quiet", *args,
        ],
        capture_output=True, text=True, timeout=120, check=False,
        env={**_clean_environ(), **(env or {})},
    )  # fmt: skip
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    assert SECRET not in proc.stdout + proc.stderr
    return proc.returncode, report, proc.stderr


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}


def samples_stored(database_url: str) -> int:
    return int(scalar(database_url, "SELECT count(DISTINCT (device_id, ts)) FROM readings") or 0)


def with_password(database_url: str) -> str:
    """The DSN with a password in it (the throwaway server trusts local connections and
    ignores it), so that the daemon's log lines can be searched for it."""
    parts = urlsplit(database_url)
    if parts.password is not None or not parts.username:
        pytest.skip("the test database's DSN already has a password, or no user name")
    netloc = f"{parts.username}:{DAEMON_PASSWORD}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_credentials_from_files_data_lands(
    locked_broker: Broker, database_url: str, tmp_path: Path
) -> None:
    topic = unique_topic()
    env = {
        "INGEST_MQTT_USERNAME": "ingest",
        "INGEST_MQTT_PASSWORD_FILE": str(secret_file(tmp_path, "daemon-pw", DAEMON_PASSWORD)),
        "INGEST_LOG_LEVEL": "DEBUG",
    }
    with Daemon(
        database_url=with_password(database_url),
        mqtt_url=locked_broker.url,
        topic=topic,
        extra_env=env,
    ) as daemon:
        daemon.wait_subscribed(60)
        device_pw = secret_file(tmp_path, "device-pw", DEVICE_PASSWORD)
        code, report, err = simulate(
            "--mqtt-url", locked_broker.url, "--topic", topic,
            "--username", "device", "--password-file", str(device_pw),
        )  # fmt: skip
        assert code == 0, err
        assert report is not None and report["published"] == DEVICES * COUNT
        wait_until(lambda: samples_stored(database_url) == DEVICES * COUNT, 60, what="samples")
        assert daemon.stop() == 0
    assert SECRET not in daemon.log_text()


def test_without_credentials_or_with_wrong_ones_nothing_connects_and_nothing_leaks(
    locked_broker: Broker, database_url: str, tmp_path: Path
) -> None:
    topic = unique_topic()
    code, report, err = simulate("--mqtt-url", locked_broker.url, "--topic", topic)
    assert code == 1 and report is None and "not authorized" in err
    wrong = secret_file(tmp_path, "wrong", f"wrong-{SECRET}")
    code, report, err = simulate(
        "--mqtt-url", locked_broker.url, "--topic", topic,
        "--username", "device", "--password-file", str(wrong),
    )  # fmt: skip
    assert code == 1 and report is None
    assert "not authorized" in err or "bad user name or password" in err
    assert err.count("\n") == 1
    # The daemon with a wrong password in its URL: refused, retried, the password never logged.
    url = locked_broker.url.replace("mqtt://", f"mqtt://ingest:wrong-{SECRET}@")
    with Daemon(database_url=database_url, mqtt_url=url, topic=topic) as daemon:
        wait_until(lambda: "not authorized" in daemon.log_text().lower(), 60, what="refusal")
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert "subscribed to" not in daemon.log_text()
        daemon.stop()
    assert SECRET not in daemon.log_text()
    assert samples_stored(database_url) == 0


# Passwords with a character that must be percent-encoded in a URL, left as typed.
MALFORMED = [
    f"ingest:{SECRET}/x@127.0.0.1:1",
    f"ingest:{SECRET}?x@127.0.0.1:1",
    f"ingest:{SECRET}#x@127.0.0.1:1",
    f"ingest:{SECRET}@x@127.0.0.1:1",
    f"ingest:{SECRET}[x@127.0.0.1:1",
    f"ingest:{SECRET}@127.0.0.1:99999",
]


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False,
        env={**_clean_environ(), **env},
    )  # fmt: skip


@pytest.mark.parametrize("authority", MALFORMED)
@pytest.mark.parametrize(
    ("command", "variable", "scheme"),
    [
        (["ingest", "run"], "INGEST_MQTT_URL", "mqtt"),
        (["ingest", "run"], "INGEST_DATABASE_URL", "postgresql"),
        (["simulators", "--count", "1"], "INGEST_MQTT_URL", "mqtt"),
    ],
)
def test_a_malformed_url_is_one_line_exit_2_without_the_password(
    authority: str, command: list[str], variable: str, scheme: str
) -> None:
    url = f"{scheme}://{authority}" + ("/db" if scheme == "postgresql" else "")
    proc = run([sys.executable, "-m", *command], {variable: url})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert SECRET not in output
    assert output.count("\n") == 1 and variable in output
    assert "Traceback" not in output


@pytest.mark.parametrize("authority", MALFORMED[:3])
def test_simulate_names_the_flag_when_the_url_came_from_it(authority: str) -> None:
    url = f"mqtt://{authority}"
    proc = run([sys.executable, "-m", "simulators", "--count", "1", "--mqtt-url", url], {})
    assert proc.returncode == 2
    assert proc.stderr.startswith("simulate: error: --mqtt-url: ") and proc.stdout == ""
    assert SECRET not in proc.stderr and proc.stderr.count("\n") == 1
