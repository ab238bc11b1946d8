"""What the broker says, named by the daemon, against a real throwaway Mosquitto: wrong
credentials (CONNACK "bad user name or password" / "not authorized") and a client id taken
over by another client. Each is logged in one clear line, counted by cause in
``ingest_broker_disconnects_total``, and retried with a backoff that a connection taken away at
once does not reset; the daemon recovers as soon as the cause is gone."""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.devservers.brokers import Broker
from ingest.devservers.ports import free_port
from ingest.devservers.throwaway import MosquittoFactory
from ingest.devservers.tls import mosquitto_password_file
from tests.integration.support import Daemon, Publisher, fleet, unique_topic, wait_rows, wait_until

READINGS_PER_SAMPLE = 5
PASSWORD = "rightPassw0rd"
REFUSED = "refused the connection"


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def attempts(daemon: Daemon, needle: str) -> list[int]:
    """The attempt numbers of the log lines holding ``needle``."""
    return [
        int(found.group(1))
        for line in daemon.log_text().splitlines()
        if needle in line and (found := re.search(r"attempt (\d+)", line))
    ]


@pytest.fixture
def locked_broker(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> Broker:
    passwords = mosquitto_password_file(tmp_path / "passwd", {"ingest": PASSWORD})
    return mosquitto_factory(password_file=passwords, allow_anonymous=False)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_wrong_password_is_named_counted_and_retried(
    database_url: str, locked_broker: Broker, protocol: str
) -> None:
    port = free_port()
    env = {
        "INGEST_MQTT_USERNAME": "ingest",
        "INGEST_MQTT_PASSWORD": "wrong-password",
        "INGEST_MQTT_PROTOCOL": protocol,
        "INGEST_METRICS_PORT": str(port),
    }
    template = unique_topic()
    with Daemon(
        database_url=database_url, mqtt_url=locked_broker.url, topic=template, extra_env=env
    ) as daemon:
        wait_until(lambda: len(attempts(daemon, REFUSED)) >= 3, timeout=60, what="three refusals")
        assert daemon.proc is not None and daemon.proc.poll() is None  # retried, not a crash
        line = next(x for x in daemon.log_text().splitlines() if REFUSED in x)
        # Mosquitto answers a wrong password with "not authorized" (other brokers: "bad user
        # name or password"); either way the line says what to fix: the credentials.
        assert re.search(r"not authorized|bad user name or password", line)
        assert "INGEST_MQTT_PASSWORD" in line
        assert "wrong-password" not in daemon.log_text()
        assert metric(port, "ingest_broker_disconnects_total", cause="not_authorized") >= 3
        assert attempts(daemon, REFUSED)[:3] == [1, 2, 3]
    # The operator fixes the password: the next start connects and delivers.
    env["INGEST_MQTT_PASSWORD"] = PASSWORD
    with Daemon(
        database_url=database_url, mqtt_url=locked_broker.url, topic=template, extra_env=env
    ) as daemon:
        daemon.wait_subscribed()
        assert daemon.stop() == 0


class Thief:
    """A client that keeps connecting with the daemon's client id, as a misconfigured second
    daemon would: paho reconnects it a second after each time it is thrown out. Like a second
    daemon, it keeps the persistent session (and the subscription in it) instead of wiping it,
    and subscribes to nothing itself."""

    def __init__(self, url: str, client_id: str, protocol: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        v5 = protocol == "5"
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600
        self.client.connect(
            "127.0.0.1",
            port,
            keepalive=30,
            clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def thieves() -> Iterator[list[Thief]]:
    started: list[Thief] = []
    yield started
    for thief in started:
        thief.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_client_id_taken_over_is_named_and_backs_off(
    database_url: str,
    mosquitto_factory: MosquittoFactory,
    thieves: list[Thief],
    protocol: str,
) -> None:
    broker = mosquitto_factory()
    port = free_port()
    client_id = f"ingest-stolen-{uuid.uuid4().hex[:6]}"
    template = unique_topic()
    env = {"INGEST_MQTT_PROTOCOL": protocol, "INGEST_METRICS_PORT": str(port)}
    with Daemon(
        database_url=database_url,
        mqtt_url=broker.url,
        topic=template,
        client_id=client_id,
        extra_env=env,
    ) as daemon:
        daemon.wait_subscribed()
        thieves.append(Thief(broker.url, client_id, protocol))
        needle = f"client id {client_id} may be in use by another client"
        wait_until(
            lambda: max(attempts(daemon, needle), default=0) >= 3,
            timeout=90,
            what="three take-overs in a row",
        )
        # Connections that were taken away at once did not restart the backoff: the attempts
        # keep counting up although each of them connected and subscribed.
        assert attempts(daemon, needle)[:3] == [1, 2, 3]
        assert metric(port, "ingest_broker_disconnects_total", cause="taken_over") >= 2
        # The other client goes away: the daemon takes its session back and delivers what was
        # published meanwhile (queued in the session, whichever client held it last).
        thieves.pop().stop()
        messages = fleet(template, devices=2, count=5)
        with Publisher(broker.url) as pub:
            pub.publish_many(messages)
        wait_rows(database_url, len(messages) * READINGS_PER_SAMPLE, timeout=90)
        assert daemon.stop() == 0
