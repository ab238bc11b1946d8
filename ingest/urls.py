"""Broker and database URLs: one strict parser and one redactor for the daemon and the simulator.

The rules (docs/design.md, Configuration): ``mqtt://[user[:password]@]host[:port]`` (1883) or
``mqtts://...`` (8883), with no path other than ``/``, no query, a port from 1 to 65535;
``postgresql://`` (or ``postgres://``) DSNs as libpq reads them (several ``host:port`` pairs,
a database, query parameters). In the user name and password ``/ ? # @ [ ]`` must be
percent-encoded; an unencoded one is an error, never a guess, because a guess would move part
of the password into the host, the path or the query, and from there into a log line.

A :class:`UrlError` never quotes the URL: it names what is wrong and how to fix it. Logs show
URLs through :func:`redact_url`, which hides the password whatever the string looks like.
Pure functions on strings: no I/O, nothing of the daemon's decoding, so the simulator can use it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

__all__ = [
    "DATABASE_SHAPE",
    "MQTT_SHAPE",
    "MqttEndpoint",
    "UrlError",
    "broker_name",
    "check_database_url",
    "parse_mqtt_url",
    "redact_url",
    "redact_urls_in",
]

MQTT_SHAPE = "mqtt://[user:pass@]host[:port] or mqtts://..."
DATABASE_SHAPE = "postgresql://user:pass@host:port/db"

_MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_DATABASE_SCHEMES = ("postgresql", "postgres")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# A query parameter that holds a secret (libpq's password and sslpassword): masked in logs.
_SECRET_PARAM = re.compile(r"((?:^|[?&])[^=&#]*password=)[^&#]*", re.IGNORECASE)
# RFC 3986 reg-name without its sub-delimiters (no host name needs them; a "," separates libpq's
# hosts): anything else in a host is more likely a piece of a password than a name.
_HOST = re.compile(r"[A-Za-z0-9._~%-]*")
_ENCODE_HINT = "percent-encode / ? # @ [ ] in the user name and password (%2F %3F %23 %40 %5B %5D)"


class UrlError(ValueError):
    """A malformed URL. The message never contains any part of the URL."""


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    """Where and how to reach a broker. The URL gives the first five fields; the TLS files
    come from settings (the daemon's ``INGEST_MQTT_*_FILE``, the simulator's flags)."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        """Same as :func:`parse_mqtt_url`."""
        return parse_mqtt_url(url)

    def redacted(self) -> str:
        """``mqtt[s]://user:***@host:port``: the endpoint for messages and reports."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = ""
        if self.username is not None:
            user = quote(self.username, safe="")
            user += ":***@" if self.password is not None else "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{user}{host}:{self.port}"

    def name(self) -> str:
        """``mqtt[s]://host:port``, without user info: how a broker is named in the database
        and in metrics (the same broker whatever login reaches it)."""
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class _Parts:
    scheme: str
    userinfo: str | None  # as written (percent-encoded); None without an "@"
    hosts: tuple[tuple[str, int | None], ...]  # decoded host (IPv6 without brackets), port
    path: str
    query: str


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse a broker URL; raises :class:`UrlError`."""
    parts = _split(url.strip(), MQTT_SHAPE, tuple(_MQTT_PORTS))
    if parts.path not in ("", "/") or parts.query:
        raise UrlError(f"a broker URL has no path or query; {_ENCODE_HINT}")
    host, port = parts.hosts[0]
    if not host:
        raise UrlError(f"no host: must look like {MQTT_SHAPE}")
    username, password = _credentials(parts.userinfo)
    if password is not None and username is None:
        raise UrlError("a password needs a user name")
    return MqttEndpoint(
        host=host,
        port=_MQTT_PORTS[parts.scheme] if port is None else port,
        tls=parts.scheme == "mqtts",
        username=username,
        password=password,
    )


def broker_name(url: str) -> str:
    """The name of the broker ``url`` reaches (:meth:`MqttEndpoint.name`); raises
    :class:`UrlError`."""
    return parse_mqtt_url(url).name()


def check_database_url(url: str) -> None:
    """Check a PostgreSQL DSN the way the daemon needs it; raises :class:`UrlError`.

    Several ``host:port`` pairs, an empty host (libpq's defaults) and query parameters
    (``sslmode``, ``sslrootcert``, ...) are allowed; libpq reads the rest.
    """
    _split(url.strip(), DATABASE_SHAPE, _DATABASE_SCHEMES, several_hosts=True)


def redact_url(url: str) -> str:
    """The URL with its password (and any ``password=`` parameter) replaced by ``***``.

    A URL that parses keeps its user name, hosts, path and query. One that does not parse
    loses everything between ``://`` and its last ``@`` (where a password could hide), or
    everything after ``://`` when it has no ``@``; a string that is not a URL at all is not
    shown. Never raises.
    """
    match = _SCHEME.match(url)
    if match is None:
        return "<not a URL>"
    rest = url[match.end() :]
    try:
        parts = _split(url, "", None, several_hosts=True)
    except UrlError:
        at = rest.rfind("@")
        if at < 0:
            return f"{match.group(0)}***"
        return f"{match.group(0)}***@{_mask_params(rest[at + 1 :])}"
    if parts.userinfo is None:
        return _mask_params(url)
    user, colon, _ = parts.userinfo.partition(":")
    after = _mask_params(rest[len(parts.userinfo) + 1 :])
    return f"{match.group(0)}{user}{':***' if colon else ''}@{after}"


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*")


def redact_urls_in(text: str) -> str:
    """``text`` (an error message that may quote what was typed) with every URL in it
    redacted by :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group()), text)


def _mask_params(text: str) -> str:
    return _SECRET_PARAM.sub(r"\1***", text)


def _split(
    url: str, shape: str, schemes: tuple[str, ...] | None, *, several_hosts: bool = False
) -> _Parts:
    """The URL's parts; ``schemes``: those allowed (None: any)."""
    match = _SCHEME.match(url)
    if match is None:
        raise UrlError(f"not a URL: must look like {shape}")
    if schemes is not None and match.group(1).lower() not in schemes:
        raise UrlError(f"unknown scheme: must look like {shape}")
    if not url.isprintable():  # a space is printable: libpq and asyncpg take it as typed
        raise UrlError("control characters (tabs, line breaks) must be percent-encoded")
    rest = url[match.end() :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    path, _, query = tail.partition("?")
    _check_after_authority(path, query)
    userinfo, at, hostports = authority.rpartition("@")
    if at and ("@" in userinfo or "[" in userinfo or "]" in userinfo):
        raise UrlError(f"an unencoded '@', '[' or ']' in the user info; {_ENCODE_HINT}")
    pieces = hostports.split(",") if several_hosts else [hostports]
    return _Parts(
        scheme=match.group(1).lower(),
        userinfo=userinfo if at else None,
        hosts=tuple(_host_port(piece) for piece in pieces),
        path=path,
        query=query,
    )


def _check_after_authority(path: str, query: str) -> None:
    # An "@" after the host is nearly always a password whose "/", "?" or "#" ended the
    # host early. The one exception libpq users write is an e-mail-like ``user=`` parameter.
    stray_at = "@" in path or any(
        "@" in key or ("@" in value and key != "user")
        for key, _, value in (param.partition("=") for param in query.split("&"))
    )
    if stray_at:
        raise UrlError(f"an '@' after the host; {_ENCODE_HINT}")
    if "#" in path or "#" in query:
        raise UrlError(f"a '#' is not allowed in this URL; {_ENCODE_HINT}")


def _host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; the port None when not given."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UrlError("an unclosed '[' in the host (an IPv6 address goes in [...])")
        host = unquote(text[1:close])
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UrlError("[...] must hold an IPv6 address") from None
        after = text[close + 1 :]
        if after and not after.startswith(":"):
            raise UrlError("unexpected text after the IPv6 address")
        port_text = after[1:] if after else None
    else:
        if "[" in text or "]" in text:
            raise UrlError("'[' and ']' may only enclose an IPv6 address")
        host, colon, port_text_ = text.partition(":")
        if ":" in port_text_:
            raise UrlError("more than one ':' in the host (an IPv6 address goes in [...])")
        if not _HOST.fullmatch(host):
            raise UrlError(
                f"the host may hold letters, digits, '.', '-', '_', '~' and %-escapes; {_ENCODE_HINT}"
            )
        host = unquote(host).lower()
        port_text = port_text_ if colon else None
    if not port_text:  # "host:" is allowed by RFC 3986: the default port
        return host, None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise UrlError("the port must be a number from 1 to 65535")
    return host, int(port_text)


def _credentials(userinfo: str | None) -> tuple[str | None, str | None]:
    if userinfo is None:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)
