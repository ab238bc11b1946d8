"""The TLS context and credentials of the broker connection (docs/design.md, Configuration).

For ``mqtts://`` the broker's certificate and host name are always verified: against
``INGEST_MQTT_CA_FILE`` when set, else the system's trust store. ``INGEST_MQTT_CERT_FILE`` and
``INGEST_MQTT_KEY_FILE`` add a client certificate (mutual TLS); an encrypted key needs
``INGEST_MQTT_KEY_PASSWORD``. There is no setting that turns verification off.

The files are read on each new connection (call ``tls_context`` from a worker thread: it
reads files), so certificates renewed on disk are picked up at the next reconnect.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from ingest.errors import ConfigError
from ingest.settings import Settings

__all__ = ["Credentials", "credentials", "tls_context"]


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str | None
    password: str | None

    def __repr__(self) -> str:  # never print the password
        return (
            f"Credentials(username={self.username!r}, password={'***' if self.password else None})"
        )


def credentials(settings: Settings) -> Credentials:
    """The explicit settings win over the URL's user info, field by field."""
    endpoint = settings.mqtt_endpoint()
    username = settings.mqtt_username if settings.mqtt_username is not None else endpoint.username
    password = settings.mqtt_password if settings.mqtt_password is not None else endpoint.password
    return Credentials(username, password)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for an ``mqtts://`` URL (None for ``mqtt://``); ``ConfigError`` naming the
    setting whose file cannot be used."""
    if not settings.mqtt_endpoint().tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    _load_trust(context, settings.mqtt_ca_file)
    if settings.mqtt_cert_file is not None:
        _load_client_certificate(context, settings)
    return context


def _load_trust(context: ssl.SSLContext, ca_file: str | None) -> None:
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        return
    try:
        context.load_verify_locations(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError("INGEST_MQTT_CA_FILE", f"cannot use {ca_file}: {_why(exc)}") from None


def _load_client_certificate(context: ssl.SSLContext, settings: Settings) -> None:
    cert_file = settings.mqtt_cert_file
    assert cert_file is not None
    key_file = settings.mqtt_key_file
    asked = False

    def password() -> str:
        # A callable, so that OpenSSL never prompts on the terminal for an encrypted key.
        nonlocal asked
        asked = True
        return settings.mqtt_key_password or ""

    try:
        context.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError as exc:
        if asked and settings.mqtt_key_password is None:
            raise ConfigError(
                "INGEST_MQTT_KEY_PASSWORD",
                f"the key {key_file or cert_file} is encrypted: set INGEST_MQTT_KEY_PASSWORD",
            ) from None
        if asked:
            raise ConfigError(
                "INGEST_MQTT_KEY_PASSWORD", f"does not decrypt the key {key_file or cert_file}"
            ) from None
        setting = "INGEST_MQTT_KEY_FILE" if key_file is not None else "INGEST_MQTT_CERT_FILE"
        raise ConfigError(
            setting,
            f"cannot use {cert_file}{f' with {key_file}' if key_file else ''}: {_why(exc)}",
        ) from None
    except OSError as exc:
        # ssl does not say which of the two files it could not open.
        setting, path = "INGEST_MQTT_CERT_FILE", cert_file
        if key_file is not None and os.access(cert_file, os.R_OK):
            setting, path = "INGEST_MQTT_KEY_FILE", key_file
        raise ConfigError(setting, f"cannot read {path}: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not a PEM file it can use"
    return exc.strerror or str(exc)
