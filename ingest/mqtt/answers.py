"""What the broker (or the TLS layer) said when a connection failed or ended, in words an
operator can act on, and one short cause for the ``ingest_broker_disconnects`` metric.

aiomqtt reports a refused CONNACK as ``MqttConnectError`` carrying paho's reason code, a lost
connection as ``MqttCodeError`` (MQTT v5 brokers say why: DISCONNECT 0x8E "session taken
over"), and a failed TLS handshake only as the text of the ``ssl`` error. MQTT 3.1.1 brokers
just close the socket of a client whose id another client took: a connection lost soon after
it was made is the only sign, so it is reported as a possible take-over.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass

from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["CAUSES", "BrokerAnswer", "explain"]

#: Every cause ``explain`` returns (the metric's label values).
CAUSES = ("not_authorized", "taken_over", "tls", "refused", "timeout", "disconnected", "error")

# CONNACK: MQTT 3.1.1 return codes 4 and 5, MQTT v5 reason codes 0x86 and 0x87 (paho 2 gives
# v5 reason codes for both protocol versions; aiomqtt may keep the 3.1.1 integer).
_BAD_CREDENTIALS = {4, 0x86}
_NOT_AUTHORIZED = {5, 0x87}
_SESSION_TAKEN_OVER = 0x8E
_VERIFY_FAILED = re.compile(r"certificate verify failed: ([^(]*)")


@dataclass(frozen=True, slots=True)
class BrokerAnswer:
    cause: str  # one of CAUSES
    text: str  # one line for the log, never holding a secret


def explain(exc: BaseException, *, client_id: str, lost_soon: bool) -> BrokerAnswer:
    """Why the connection failed or ended. ``lost_soon``: it was established, then lost before
    it had lasted, which an MQTT 3.1.1 broker does to a client whose id another client took."""
    code = _reason_code(exc)
    text = " ".join(str(exc).split())
    if code in _BAD_CREDENTIALS or code in _NOT_AUTHORIZED:
        what = "bad user name or password" if code in _BAD_CREDENTIALS else "not authorized"
        return BrokerAnswer(
            "not_authorized",
            f"the broker refused the connection: {what} (check the credentials: "
            "INGEST_MQTT_USERNAME / INGEST_MQTT_PASSWORD or the URL's user info)",
        )
    plain = _plain_cause(exc, text.lower())
    if code == _SESSION_TAKEN_OVER or (lost_soon and plain == "disconnected"):
        how = (
            "the broker says the session was taken over"
            if code == _SESSION_TAKEN_OVER
            else "connection lost right after it was made"
        )
        return BrokerAnswer(
            "taken_over",
            f"{how}: client id {client_id} may be in use by another client "
            "(INGEST_CLIENT_ID must be unique to each daemon)",
        )
    tls = _tls_problem(exc, text)
    if tls is not None:
        return BrokerAnswer("tls", tls)
    return BrokerAnswer(plain, f"unavailable ({text})")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _reason_code(exc: BaseException) -> int | None:
    for err in _chain(exc):
        rc = getattr(err, "rc", None)
        if isinstance(rc, ReasonCode):
            return int(rc.value)
        if isinstance(rc, int):
            # aiomqtt keeps an integer for CONNACK only: anything else is a paho error number.
            return rc if type(err).__name__ == "MqttConnectError" else None
    return None


def _tls_problem(exc: BaseException, text: str) -> str | None:
    for err in _chain(exc):
        if isinstance(err, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {err.verify_message}"
        if isinstance(err, ssl.SSLError):
            return f"TLS handshake failed: {err.reason or err}"
    # aiomqtt turns connect()'s OSError into MqttError(str(error)): only the text is left.
    found = _VERIFY_FAILED.search(text)
    if found:
        return f"TLS certificate verify failed: {found.group(1).strip()}"
    if text.startswith("[SSL") or "SSL:" in text:
        return f"TLS handshake failed: {text}"
    return None


def _plain_cause(exc: BaseException, text: str) -> str:
    if any(isinstance(err, ConnectionRefusedError) for err in _chain(exc)) or "refused" in text:
        return "refused"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "disconnect" in text or "connection lost" in text or "connection was lost" in text:
        return "disconnected"
    return "error"
