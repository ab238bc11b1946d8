"""How the benchmark's own clients reach a broker URL: host, port, credentials and, for
``mqtts://``, a TLS context that verifies the certificate and the host name like the daemon.

Small on purpose (``ssl`` and the project's URL parser only): the bare client imports it, and
its start-up is part of what it measures.
"""

from __future__ import annotations

import ssl

from ingest.urls import MqttEndpoint, parse_mqtt_url

__all__ = ["client_endpoint", "tls_context"]


def tls_context(endpoint: MqttEndpoint, ca_file: str | None) -> ssl.SSLContext | None:
    """None for ``mqtt://``; for ``mqtts://`` a client context trusting ``ca_file`` (the
    system's certificates without one), certificate and host name verification on."""
    if not endpoint.tls:
        if ca_file is not None:
            raise ValueError("--ca-file is for an mqtts:// URL")
        return None
    return ssl.create_default_context(cafile=ca_file)


def client_endpoint(url: str, ca_file: str | None) -> tuple[MqttEndpoint, ssl.SSLContext | None]:
    """``url`` parsed by the project's parser, and its TLS context (see :func:`tls_context`)."""
    endpoint = parse_mqtt_url(url)
    return endpoint, tls_context(endpoint, ca_file)
