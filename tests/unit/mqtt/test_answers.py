"""What the daemon makes of the broker's answers (ingest.mqtt.answers.explain), on the
exceptions aiomqtt really raises."""

from __future__ import annotations

import ssl

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttCodeError, MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from ingest.mqtt.answers import CAUSES, explain


def connack(code: int) -> MqttConnectError:
    return MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=code))


def lost(code: int) -> aiomqtt.MqttError:
    """As MqttSession.wait_inbox raises it: the disconnect reason is the cause."""
    try:
        try:
            raise MqttCodeError(
                ReasonCode(PacketTypes.DISCONNECT, identifier=code), "Unexpected disconnection"
            )
        except MqttCodeError as inner:
            raise aiomqtt.MqttError("disconnected from the broker") from inner
    except aiomqtt.MqttError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (connack(0x87), "not authorized"),
        (connack(0x86), "bad user name or password"),
        (MqttConnectError(5), "not authorized"),
        (MqttConnectError(4), "bad user name or password"),
    ],
)
def test_refused_credentials(error: Exception, words: str) -> None:
    answer = explain(error, client_id="ingest-a", lost_soon=False)
    assert answer.cause == "not_authorized"
    assert words in answer.text
    assert "INGEST_MQTT_PASSWORD" in answer.text


def test_v5_session_taken_over() -> None:
    answer = explain(lost(0x8E), client_id="ingest-a", lost_soon=False)
    assert answer.cause == "taken_over"
    assert "client id ingest-a may be in use by another client" in answer.text


def test_a_connection_lost_at_once_may_be_a_take_over() -> None:
    answer = explain(lost(0x80), client_id="ingest-a", lost_soon=True)
    assert answer.cause == "taken_over"
    assert "client id ingest-a may be in use by another client" in answer.text


def test_a_connection_lost_after_it_lasted_is_a_plain_disconnect() -> None:
    answer = explain(lost(0x80), client_id="ingest-a", lost_soon=False)
    assert answer.cause == "disconnected"
    assert answer.text.startswith("unavailable (")


def test_a_refused_subscription_soon_after_connecting_is_not_a_take_over() -> None:
    error = aiomqtt.MqttError("subscription refused by the broker: Not authorized")
    assert explain(error, client_id="ingest-a", lost_soon=True).cause != "taken_over"


def test_certificate_verification_names_the_cause() -> None:
    # aiomqtt turns connect()'s ssl error into MqttError(str(error)) from None.
    text = (
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local "
        "issuer certificate (_ssl.c:1006)"
    )
    answer = explain(aiomqtt.MqttError(text), client_id="x", lost_soon=False)
    assert answer.cause == "tls"
    assert answer.text == "TLS certificate verify failed: unable to get local issuer certificate"


def test_a_chained_ssl_error() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "Hostname mismatch, certificate is not valid for 'broker'."
    try:
        raise aiomqtt.MqttError("connect failed") from error
    except aiomqtt.MqttError as exc:
        answer = explain(exc, client_id="x", lost_soon=False)
    assert answer.cause == "tls"
    assert "Hostname mismatch" in answer.text


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("[Errno 111] Connection refused", "refused"),
        ("timed out", "timeout"),
        ("disconnected from the broker", "disconnected"),
        ("something else", "error"),
    ],
)
def test_plain_causes(text: str, cause: str) -> None:
    answer = explain(aiomqtt.MqttError(text), client_id="x", lost_soon=False)
    assert answer.cause == cause
    assert answer.cause in CAUSES
