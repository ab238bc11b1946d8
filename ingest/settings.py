"""Settings: frozen, keyword-only, validated at construction.

Precedence (docs/design.md): command-line flags > ``INGEST_*`` environment variables > the
optional TOML file given with ``--config``. Every field has one documented default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from ingest.errors import ConfigError
from ingest.urls import (
    MqttEndpoint,
    UrlError,
    check_database_url,
    parse_mqtt_url,
    redact_url,
    split_mqtt_urls,
)

__all__ = [
    "MqttEndpoint",
    "Settings",
    "format_duration",
    "load_settings",
    "parse_duration",
    "parse_retention",
    "parse_time",
    "redact_url",
    "worker_environ",
]

_PROTOCOLS = ("3.1.1", "5")
_DEFAULT_TOPIC = "devices/{device_id}/telemetry"
_DEFAULT_MQTT_URL = "mqtt://localhost:1883"
_LOG_FORMATS = ("auto", "json", "text")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _default_client_id() -> str:
    return f"ingest-{socket.gethostname()}"


# The groups settings are listed under, in --help, the README and ingest.example.toml.
CONNECTIONS = "Connections"
FLOW = "Flow: buffers, batches, timeouts"
LIMITS = "Limits on one device message"
UPKEEP = "Database upkeep"
OBSERVABILITY = "Observability"
INTERNAL = "Internal"


def _setting(
    env: str,
    default: Any,
    *,
    group: str,
    help: str,
    shown: str | None = None,
    example: str | None = None,
    secret: bool = False,
    secret_url: bool = False,
) -> Any:
    """A field described once: its variable, help, group, how its default reads and whether
    it is a secret (never shown); a URL may hold one (``secret_url``: shown redacted)."""
    metadata = {
        "env": env,
        "help": help,
        "group": group,
        "shown": shown,
        "example": example,
        "secret": secret,
        "secret_url": secret_url,
    }
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the daemon can be told, each field described once by ``_setting``: the
    README table, ``--help`` and ``ingest.example.toml`` are written from that metadata."""

    # -- connections ----------------------------------------------------------------------
    database_url: str | None = _setting(
        "INGEST_DATABASE_URL", None, group=CONNECTIONS, secret_url=True,
        shown="libpq defaults (`PGHOST`, `PGPORT`, `PGUSER`, ...)",
        example="postgresql://ingest_app:secret@db:5432/ingest?sslmode=verify-full",
        help="PostgreSQL DSN `postgresql://user:pass@host:port/db`; TLS as libpq does it: "
        "`?sslmode=verify-full&sslrootcert=...&sslcert=...&sslkey=...`",
    )  # fmt: skip
    mqtt_url: str = _setting(
        "INGEST_MQTT_URL", _DEFAULT_MQTT_URL, group=CONNECTIONS, secret_url=True,
        help="broker, `mqtt://[user:pass@]host[:port]` or `mqtts://...` (TLS, certificate and "
        "host name always verified); several brokers separated by commas, each served by its "
        "own worker set (README, Several brokers)",
    )  # fmt: skip
    # -- brokers: [[brokers]] in the config file, carried as JSON like the routes -------------
    brokers: str | None = _setting(
        "INGEST_BROKERS", None, group=CONNECTIONS, secret=True,
        shown="the brokers of `INGEST_MQTT_URL`",
        example='[{"url": "mqtts://b1:8883", "ca_file": "/run/secrets/b1-ca.pem"}]',
        help="the broker list as JSON, what `[[brokers]]` tables in the config file give: "
        "`url` and, per broker, `username`, `password`, `ca_file`, `cert_file`, `key_file` "
        "(else the `INGEST_MQTT_*` settings); setting it and `INGEST_MQTT_URL` is a "
        "configuration error",
    )  # fmt: skip
    mqtt_username: str | None = _setting(
        "INGEST_MQTT_USERNAME", None, group=CONNECTIONS, example="ingest",
        help="broker user name (wins over the URL's user info)",
    )  # fmt: skip
    mqtt_password: str | None = _setting(
        "INGEST_MQTT_PASSWORD", None, group=CONNECTIONS, secret=True, example="secret",
        help="broker password (wins over the URL's); best given as `INGEST_MQTT_PASSWORD_FILE`",
    )  # fmt: skip
    mqtt_ca_file: str | None = _setting(
        "INGEST_MQTT_CA_FILE", None, group=CONNECTIONS, shown="the system's trust store",
        example="/run/secrets/mqtt-ca.pem",
        help="PEM bundle that verifies the broker's certificate (`mqtts://` only)",
    )  # fmt: skip
    mqtt_cert_file: str | None = _setting(
        "INGEST_MQTT_CERT_FILE", None, group=CONNECTIONS, example="/run/secrets/mqtt-client.pem",
        help="client certificate (PEM) for mutual TLS (`mqtts://` only)",
    )  # fmt: skip
    mqtt_key_file: str | None = _setting(
        "INGEST_MQTT_KEY_FILE", None, group=CONNECTIONS, shown="the certificate file",
        example="/run/secrets/mqtt-client.key",
        help="the client certificate's private key (PEM)",
    )  # fmt: skip
    mqtt_key_password: str | None = _setting(
        "INGEST_MQTT_KEY_PASSWORD", None, group=CONNECTIONS, secret=True, example="secret",
        help="password of an encrypted client key",
    )  # fmt: skip
    mqtt_protocol: str = _setting(
        "INGEST_MQTT_PROTOCOL", "3.1.1", group=CONNECTIONS,
        help="`3.1.1` or `5` (3.1.1 is the default: paho's v5 path parses properties per "
        "message in Python and halves throughput)",
    )  # fmt: skip
    topic: str = _setting(
        "INGEST_TOPIC", _DEFAULT_TOPIC, group=CONNECTIONS,
        help="the topic template of a single `json` route (more routes, other formats: "
        "`[[routes]]` in the config file); `{device_id}` (and optionally `{metric}`) name one "
        "level; it also gives the subscription filter",
    )  # fmt: skip
    # -- routes: [[routes]] in the config file, carried as JSON (to worker processes too) ----
    routes: str | None = _setting(
        "INGEST_ROUTES", None, group=CONNECTIONS, shown="one `json` route on `INGEST_TOPIC`",
        example='[{"topic": "stat/{device_id}/{metric}", "format": "value"}]',
        help="the route table as JSON, what `[[routes]]` tables in the config file give "
        "(README, Routes); setting it and `INGEST_TOPIC` (even to its default, by any means) "
        "is a configuration error",
    )  # fmt: skip
    client_id: str = _setting(
        "INGEST_CLIENT_ID", _default_client_id, group=CONNECTIONS, shown="`ingest-<hostname>`",
        help="MQTT client id; stable, it names the persistent session",
    )  # fmt: skip
    share_group: str | None = _setting(
        "INGEST_SHARE_GROUP", None, group=CONNECTIONS, example="ingest",
        help="subscribe as `$share/<group>/<filter>` so several instances share the load",
    )  # fmt: skip
    mqtt_keepalive: int = _setting(
        "INGEST_MQTT_KEEPALIVE", 15, group=CONNECTIONS,
        help="seconds; how fast a dead broker link is noticed",
    )  # fmt: skip
    # Batches never wait for more messages than this; a smaller broker window is detected and
    # warned about.
    mqtt_inflight: int = _setting(
        "INGEST_MQTT_INFLIGHT", 10000, group=CONNECTIONS,
        help="unacknowledged messages the broker may have in flight to us (v5: our Receive "
        "Maximum; 3.1.1: should match the broker's `max_inflight_messages`)",
    )  # fmt: skip
    mqtt_inflight_bytes: int = _setting(
        "INGEST_MQTT_INFLIGHT_BYTES", 64 * 1024 * 1024, group=CONNECTIONS,
        shown="67108864 (64 MiB)",
        help="bytes of payload received and not yet acknowledged at most; the source stops "
        "reading above it (at least `INGEST_MAX_PAYLOAD_BYTES`)",
    )  # fmt: skip
    mqtt_session_expiry: int = _setting(
        "INGEST_MQTT_SESSION_EXPIRY", 7 * 24 * 3600, group=CONNECTIONS, shown="`604800` (7 days)",
        help="v5: seconds the broker keeps our session (and its queue) while we are away",
    )  # fmt: skip
    # -- the flow: buffers, batches, timeouts -----------------------------------------------
    channel_capacity: int = _setting(
        "INGEST_CHANNEL_CAPACITY", 2000, group=FLOW,
        help="messages buffered between the source and the batcher (the backpressure bound)",
    )  # fmt: skip
    batch_max_rows: int = _setting(
        "INGEST_BATCH_MAX_ROWS", 5000, group=FLOW, help="rows per transaction at most"
    )
    batch_max_delay: float = _setting(
        "INGEST_BATCH_MAX_DELAY", 0.02, group=FLOW,
        help="seconds a batch may wait for more messages once the writer is free",
    )  # fmt: skip
    db_pool_size: int = _setting(
        "INGEST_DB_POOL_SIZE", 3, group=FLOW,
        help="database connections, and so batches written at once (their acknowledgements "
        "still leave in receive order)",
    )  # fmt: skip
    db_connect_timeout: float = _setting(
        "INGEST_DB_CONNECT_TIMEOUT", 10.0, group=FLOW,
        help="seconds to wait for a database connection",
    )  # fmt: skip
    db_write_timeout: float = _setting(
        "INGEST_DB_WRITE_TIMEOUT", 30.0, group=FLOW,
        help="seconds one batch may take; then a tiny commit on another connection tells a "
        "database that is away (the batch is retried whole, forever) from a batch that is too "
        "slow (it is split, and a message that times out alone 3 times becomes a dead letter "
        "rejected_by_database)",
    )  # fmt: skip
    series_cache_size: int = _setting(
        "INGEST_SERIES_CACHE_SIZE", 1_000_000, group=FLOW, shown="1000000",
        help="(device, metric) -> series id pairs each worker keeps in memory (at a million: "
        "about 126 MB for devices of one metric, 89 MB for devices of 5, device ids of 14 "
        "characters); when full, the devices cached longest ago are looked up again",
    )  # fmt: skip
    sparkplug_max_aliases: int = _setting(
        "INGEST_SPARKPLUG_MAX_ALIASES", 100_000, group=FLOW, shown="100000",
        help="Sparkplug metrics each worker remembers from births (aliases, names and "
        "datatypes; each edge node and device counts one more; about 140 bytes each when "
        "nodes declare the same names, 190 when every name differs); when full, the edge "
        "nodes born longest ago are forgotten (their next data by alias asks for a rebirth)",
    )  # fmt: skip
    sparkplug_rebirth_interval: float = _setting(
        "INGEST_SPARKPLUG_REBIRTH_INTERVAL", 30.0, group=FLOW,
        help="seconds between two Rebirth requests (NCMD) to one Sparkplug edge node whose "
        "data names an alias no birth declared; 0: never ask",
    )  # fmt: skip
    retry_max_delay: float = _setting(
        "INGEST_RETRY_MAX_DELAY", 10.0, group=FLOW,
        help="longest backoff between retries, seconds",
    )  # fmt: skip
    shutdown_timeout: float = _setting(
        "INGEST_SHUTDOWN_TIMEOUT", 30.0, group=FLOW,
        help="seconds to drain on SIGTERM/SIGINT before giving up (exit 1)",
    )  # fmt: skip
    workers: int = _setting(
        "INGEST_WORKERS", 1, group=FLOW,
        help="worker processes per broker sharing one subscription (client ids "
        "`<client_id>-<i>`, with several brokers `<client_id>-b<k>-<i>`; shared group "
        "`INGEST_SHARE_GROUP` or the client id); the parent supervises them",
    )  # fmt: skip
    retire_surplus: bool = _setting(
        "INGEST_RETIRE_SURPLUS", True, group=FLOW,
        help="at start, drain and end the recorded sessions an earlier run of this client id "
        "left on this broker and this run does not use: `<client_id>-<i>` with i >= N after "
        "a larger `--workers`, the bare client id after a single worker, every "
        "`<client_id>-<i>` when running as one (README, Sessions)",
    )  # fmt: skip
    # -- limits on what one device message may cost (docs/design.md, Limits) ----------------
    max_payload_bytes: int = _setting(
        "INGEST_MAX_PAYLOAD_BYTES", 1048576, group=LIMITS, shown="1048576 (1 MiB)",
        help="a larger payload is a dead letter `too_large` (its first 64 KiB and its size kept)",
    )  # fmt: skip
    max_readings_per_message: int = _setting(
        "INGEST_MAX_READINGS_PER_MESSAGE", 10000, group=LIMITS,
        help="a message with more readings is a dead letter `too_many_readings`",
    )  # fmt: skip
    max_ts_ahead: timedelta = _setting(  # noqa: RUF009 - an immutable value
        "INGEST_MAX_TS_AHEAD", timedelta(days=1), group=LIMITS,
        help="a sample dated further ahead of its arrival is a dead letter `ts_out_of_range` "
        "(`36h`, `1d`, `90m`, `45s` or seconds)",
    )  # fmt: skip
    min_ts: datetime = _setting(  # noqa: RUF009 - an immutable value
        "INGEST_MIN_TS", datetime(2000, 1, 1, tzinfo=UTC), group=LIMITS,
        help="a sample dated earlier is a dead letter `ts_out_of_range` (RFC 3339 with offset)",
    )  # fmt: skip
    max_text_bytes: int = _setting(
        "INGEST_MAX_TEXT_BYTES", 1024, group=LIMITS,
        help="a longer text value (UTF-8 bytes) is skipped and counted",
    )  # fmt: skip
    # -- database upkeep (ingest/db/partitions.py, ingest/db/dashboard.py) --------------------
    migrate: bool = _setting(
        "INGEST_MIGRATE", True, group=UPKEEP, help="apply pending migrations at start"
    )
    retention: str | None = _setting(
        "INGEST_RETENTION", None, group=UPKEEP, shown="forever", example="30d",
        help="how long raw readings are kept (`30d`, `12w`, `36h`); whole daily partitions "
        "are dropped",
    )  # fmt: skip
    rollup_retention: str | None = _setting(
        "INGEST_ROLLUP_RETENTION", None, group=UPKEEP, shown="forever", example="52w",
        help="how long the one-minute rollups are kept (at least the retention)",
    )  # fmt: skip
    dead_letter_retention: timedelta | None = _setting(  # noqa: RUF009 - an immutable value
        "INGEST_DEAD_LETTER_RETENTION", timedelta(days=30), group=UPKEEP,
        help="how long dead letters are kept (`30d`, `12w`, `36h`, or `forever`)",
    )  # fmt: skip
    partition_days_ahead: int = _setting(
        "INGEST_PARTITION_DAYS_AHEAD", 3, group=UPKEEP,
        help="days of readings partitions created ahead of time",
    )  # fmt: skip
    dashboard_interval: float = _setting(
        "INGEST_DASHBOARD_INTERVAL", 1.0, group=UPKEEP,
        help="seconds between folds of committed batches into the dashboard tables (how far "
        "dashboards lag behind)",
    )  # fmt: skip
    # -- observability --------------------------------------------------------------------
    metrics_port: int = _setting(
        "INGEST_METRICS_PORT", 9600, group=OBSERVABILITY,
        help="port of `/metrics`, `/healthz`, `/readyz`; `0` disables; a port already taken "
        "is a configuration error",
    )  # fmt: skip
    # Loopback by default: the listener has no authentication. The container image sets 0.0.0.0.
    metrics_host: str = _setting(
        "INGEST_METRICS_HOST", "127.0.0.1", group=OBSERVABILITY,
        shown="`127.0.0.1` (the container image sets `0.0.0.0`)",
        help="address the metrics listener binds (it has no authentication)",
    )  # fmt: skip
    ready_max_lag: float = _setting(
        "INGEST_READY_MAX_LAG", 30.0, group=OBSERVABILITY,
        help="receive-to-commit lag (seconds) above which `/readyz` says not ready; also how "
        "long dashboard folds may keep failing before it does",
    )  # fmt: skip
    stats_interval: float = _setting(
        "INGEST_STATS_INTERVAL", 30.0, group=OBSERVABILITY,
        help="seconds between stats log lines",
    )  # fmt: skip
    log_level: str = _setting(
        "INGEST_LOG_LEVEL", "INFO", group=OBSERVABILITY,
        help="`DEBUG`, `INFO`, `WARNING` or `ERROR`",
    )  # fmt: skip
    log_format: str = _setting(
        "INGEST_LOG_FORMAT", "auto", group=OBSERVABILITY,
        help="`auto` (key=value text on a terminal, JSON lines otherwise), `json` or `text`",
    )  # fmt: skip
    worker_id: str | None = _setting(
        "INGEST_WORKER_ID", None, group=INTERNAL, example="0",
        help="set by the supervisor for each worker process (its metrics' `worker` label)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(_env(name), f"must be > 0, got {getattr(self, name)!r}")

        for name in (
            "mqtt_keepalive", "mqtt_inflight", "channel_capacity", "batch_max_rows",
            "db_pool_size", "db_connect_timeout", "db_write_timeout", "retry_max_delay",
            "shutdown_timeout", "stats_interval", "ready_max_lag", "workers",
            "max_payload_bytes", "max_readings_per_message", "max_text_bytes",
            "mqtt_inflight_bytes", "series_cache_size", "sparkplug_max_aliases",
        ):  # fmt: skip
            positive(name)
        self._check_limits()
        self._check_mqtt_credentials()
        if self.batch_max_delay < 0:
            raise ConfigError(_env("batch_max_delay"), "must be >= 0")
        if not self.sparkplug_rebirth_interval >= 0:
            raise ConfigError(_env("sparkplug_rebirth_interval"), "must be >= 0 (0: never ask)")
        if self.mqtt_session_expiry < 0:
            raise ConfigError(_env("mqtt_session_expiry"), "must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(_env("metrics_port"), "must be a port number (0 disables)")
        self._check_choices()
        if not self.client_id or len(self.client_id) > 200:
            raise ConfigError(_env("client_id"), "must be 1 to 200 characters")
        if self.share_group is not None and (
            not self.share_group or any(c in self.share_group for c in "/+#")
        ):
            raise ConfigError(_env("share_group"), "must be a non-empty name without / + #")
        if self.database_url is not None:
            try:
                check_database_url(self.database_url)
            except UrlError as exc:  # its message never quotes the URL
                raise ConfigError(_env("database_url"), str(exc)) from None
        self._check_upkeep()
        self._check_brokers()
        self._check_routes()

    def _check_routes(self) -> None:
        # Imported here: decode imports settings' error type, not the other way round.
        from ingest.formats.decode import load_routes

        # By value here (a Settings built in code); load_settings also catches a topic set
        # to its default, by where it came from.
        if self.routes is not None and self.topic != _DEFAULT_TOPIC:
            raise ConfigError(f"{_env('topic')} and [[routes]]", _TOPIC_AND_ROUTES)
        load_routes(self)

    def _check_choices(self) -> None:
        if self.mqtt_protocol not in _PROTOCOLS:
            raise ConfigError(_env("mqtt_protocol"), f"must be one of {', '.join(_PROTOCOLS)}")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError(_env("log_format"), f"must be one of {', '.join(_LOG_FORMATS)}")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(_env("log_level"), f"must be one of {', '.join(_LOG_LEVELS)}")

    def _check_upkeep(self) -> None:
        if not 0 < self.dashboard_interval <= 3600:
            raise ConfigError(_env("dashboard_interval"), "must be > 0 and at most 3600")
        if not 0 <= self.partition_days_ahead <= 366:
            raise ConfigError(_env("partition_days_ahead"), "must be between 0 and 366")
        retention = _retention_setting(self, "retention")
        rollup_retention = _retention_setting(self, "rollup_retention")
        if retention and rollup_retention and rollup_retention < retention:
            raise ConfigError(
                _env("rollup_retention"),
                f"must be at least {_env('retention')} ({self.retention}): the rollups are "
                "what dashboards read once raw readings are gone",
            )

    def _check_limits(self) -> None:
        if not isinstance(self.max_ts_ahead, timedelta) or self.max_ts_ahead < timedelta(0):
            raise ConfigError(_env("max_ts_ahead"), "must be a duration >= 0")
        if not isinstance(self.min_ts, datetime) or self.min_ts.utcoffset() is None:
            raise ConfigError(_env("min_ts"), "must be a timezone-aware time (RFC 3339)")
        if self.min_ts.utcoffset() != timedelta(0):
            object.__setattr__(self, "min_ts", self.min_ts.astimezone(UTC))
        if self.mqtt_inflight_bytes < self.max_payload_bytes:
            raise ConfigError(
                _env("mqtt_inflight_bytes"),
                f"must be at least {_env('max_payload_bytes')} ({self.max_payload_bytes}): "
                f"one message of the largest size allowed must fit; got {self.mqtt_inflight_bytes}",
            )
        keep = self.dead_letter_retention
        if keep is not None and (not isinstance(keep, timedelta) or keep <= timedelta(0)):
            raise ConfigError(_env("dead_letter_retention"), "must be a duration > 0, or forever")

    def _check_mqtt_credentials(self) -> None:
        for name in ("mqtt_username", "mqtt_ca_file", "mqtt_cert_file", "mqtt_key_file"):
            if getattr(self, name) == "":
                raise ConfigError(_env(name), "must not be empty (unset it instead)")
        if self.mqtt_key_file is not None and self.mqtt_cert_file is None:
            raise ConfigError(_env("mqtt_key_file"), f"needs {_env('mqtt_cert_file')} too")
        if self.mqtt_key_password is not None and self.mqtt_cert_file is None:
            raise ConfigError(_env("mqtt_key_password"), f"needs {_env('mqtt_cert_file')} too")

    def _check_no_plaintext_with_tls_files(self) -> None:
        # TLS files next to a plaintext URL mean the operator expects TLS: refuse, never
        # fall back to plaintext silently.
        endpoint = self.mqtt_endpoint()
        for name in ("mqtt_ca_file", "mqtt_cert_file"):
            if getattr(self, name) is not None and not endpoint.tls:
                raise ConfigError(
                    _env(name), f"is set but {_env('mqtt_url')} is plaintext (use mqtts://)"
                )
        if self.mqtt_password is not None and (self.mqtt_username or endpoint.username) is None:
            raise ConfigError(_env("mqtt_password"), f"needs {_env('mqtt_username')} too")

    def mqtt_endpoint(self) -> MqttEndpoint:
        """The broker as the URL gives it (ingest/urls.py); raises ConfigError. Settings of
        several brokers have none: see :meth:`broker_settings`."""
        if self.lists_brokers:
            raise ConfigError(_env("mqtt_url"), "a list of brokers: see broker_settings()")
        try:
            return parse_mqtt_url(self.mqtt_url)
        except UrlError as exc:  # its message never quotes the URL
            raise ConfigError(_env("mqtt_url"), str(exc)) from None

    @property
    def lists_brokers(self) -> bool:
        """Whether the brokers come as a list (several URLs, or ``[[brokers]]``): then only
        :meth:`broker_settings` tells each one's URL and credentials."""
        return self.brokers is not None or _lists_several(self.mqtt_url)

    def _check_brokers(self) -> None:
        if not self.lists_brokers:
            self.mqtt_endpoint()  # validates the URL
            self._check_no_plaintext_with_tls_files()
            return
        if self.brokers is not None and self.mqtt_url != _DEFAULT_MQTT_URL:
            # By value here (a Settings built in code); load_settings catches it by source.
            raise ConfigError(f"{_env('mqtt_url')} and [[brokers]]", _URL_AND_BROKERS)
        self.broker_settings()  # validates every broker, and that none is listed twice

    def broker_settings(self) -> tuple[Settings, ...]:
        """One single-broker Settings per broker, in the order given (broker ``k`` is the
        ``k``-th, 0-based): its URL, and its own credentials and TLS files, else these
        settings'. Just ``(self,)`` for one URL and no ``[[brokers]]``. Raises ConfigError
        naming the broker; a broker listed twice is one too."""
        if not self.lists_brokers:
            return (self,)
        out: list[Settings] = []
        seen: dict[str, str] = {}
        for where, values in self._broker_entries():
            try:
                one = dataclasses.replace(self, brokers=None, **values)
            except ConfigError as exc:
                where_exactly = _broker_setting(where, exc.setting, values)
                raise ConfigError(where_exactly, exc.message) from None
            name = one.mqtt_endpoint().name()
            if name in seen:
                raise ConfigError(where, f"{name} is listed twice (also {seen[name]})")
            seen[name] = where
            out.append(one)
        return tuple(out)

    def _broker_entries(self) -> list[tuple[str, dict[str, Any]]]:
        """(where, the fields that broker sets) for each broker."""
        if self.brokers is None:
            try:
                urls = split_mqtt_urls(self.mqtt_url)
            except UrlError as exc:
                raise ConfigError(_env("mqtt_url"), str(exc)) from None
            var = _env("mqtt_url")
            return [(f"{var}[{k}]", {"mqtt_url": u}) for k, u in enumerate(urls)]
        try:
            raw = json.loads(self.brokers)
        except ValueError:
            raise ConfigError(_env("brokers"), "not JSON") from None  # never quote: passwords
        if not isinstance(raw, list) or not raw:
            raise ConfigError("brokers", "must be a non-empty array of tables ([[brokers]])")
        return [_broker_entry(k, entry) for k, entry in enumerate(raw)]

    def to_environ(self) -> dict[str, str]:
        """The settings as ``INGEST_*`` variables that load back to these same settings
        (what a worker process is given). Secrets included: never log this."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "topic" and self.routes is not None:
                continue  # unused beside routes, and setting both is an error
            if value is None and str(f.type).startswith("timedelta"):
                env[_env(f.name)] = "forever"
            elif value is not None:
                env[_env(f.name)] = _format_value(value)
        return env

    def __repr__(self) -> str:
        # A Settings may end up in a traceback or a debug line: never with its secrets.
        shown = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({shown})"

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked and URLs' passwords hidden, for logs."""
        out = dataclasses.asdict(self)
        for f in fields(self):
            if out[f.name] is None:
                continue
            if f.metadata["secret"]:
                out[f.name] = "***"
            elif f.metadata["secret_url"]:
                out[f.name] = redact_url(out[f.name])
            elif isinstance(out[f.name], timedelta | datetime):
                out[f.name] = _format_value(out[f.name])  # as it is written: 1d, RFC 3339
        return out


_RETENTION_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
_FOREVER = {"", "forever", "none", "off"}


def parse_retention(value: str | None) -> timedelta | None:
    """``"30d"`` -> 30 days; ``h``, ``d`` and ``w`` units; None, ``""`` or ``forever``: None
    (keep forever). Raises ValueError on anything else."""
    if value is None or value.strip().lower() in _FOREVER:
        return None
    text = value.strip().lower()
    unit = _RETENTION_UNITS.get(text[-1:])
    if unit is None or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ValueError(f"expected a duration such as 30d, 12w or 36h, or forever; got {value!r}")
    return int(text[:-1]) * unit


def _retention_setting(settings: Settings, name: str) -> timedelta | None:
    try:
        return parse_retention(getattr(settings, name))
    except ValueError as exc:
        raise ConfigError(_env(name), str(exc)) from None


def _env(name: str) -> str:
    for f in fields(Settings):
        if f.name == name:
            return str(f.metadata["env"])
    raise KeyError(name)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


_DURATION_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}
# ``str(timedelta)``'s own form ("1 day, 2:03:04"), so a value written out reads back.
_CLOCK = re.compile(r"(?:(?P<days>\d+) days?, )?(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d(?:\.\d+)?)")


def parse_duration(value: str | float, *, forever: bool = False) -> timedelta | None:
    """``"36h"``, ``"1d"``, ``"90m"``, ``"45s"``, ``"2w"`` or plain seconds (``"30"``, 30.5).

    With ``forever``, ``"forever"`` (or ``"none"``, ``"off"``, ``""``) gives None. Raises
    ValueError on anything else, negative values included."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        if forever and text in _FOREVER:
            return None
        clock = _CLOCK.fullmatch(text)
        if clock:
            days, h, m, s = (float(clock[g] or 0) for g in ("days", "h", "m", "s"))
            return timedelta(days=days, hours=h, minutes=m, seconds=s)
        unit = _DURATION_UNITS.get(text[-1:])
        try:
            seconds = float(text[:-1]) * unit.total_seconds() if unit else float(text)
        except ValueError:
            seconds = float("nan")
    if not 0 <= seconds < 1e12:  # also rejects nan and inf
        hint = ", or forever" if forever else ""
        raise ValueError(f"expected a duration such as 36h, 1d, 90m, 45s or seconds{hint}")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest exact form ``parse_duration`` reads back: ``1d``, ``36h``, ``90m``, ``2.5s``."""
    if value.microseconds:
        return f"{value.total_seconds():g}s"
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        size = int(_DURATION_UNITS[unit].total_seconds())
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_time(value: str | datetime) -> datetime:
    """An RFC 3339 time with its offset (``2000-01-01T00:00:00Z``), returned in UTC."""
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("expected an RFC 3339 time such as 2000-01-01T00:00:00Z") from None
    if when.utcoffset() is None:
        raise ValueError("expected a time with its offset, such as 2000-01-01T00:00:00Z")
    return when.astimezone(UTC)


def _convert(name: str, raw: Any, kind: Any, source: str, *, show: bool = True) -> Any:
    """Convert a value from the environment (str) or TOML (typed) to the field's type.
    Errors quote the value only when ``show`` and the setting is not a secret."""
    what = source
    kind_s = str(kind)
    if raw is None:
        return None
    try:
        if kind_s.startswith("timedelta"):
            return parse_duration(raw, forever="None" in kind_s)
        if kind_s.startswith("datetime"):
            return parse_time(raw)
        if kind_s.startswith("bool"):
            if isinstance(raw, bool):
                return raw
            low = str(raw).strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind_s.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if kind_s.startswith("float"):
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        value = str(raw)
        if "None" in kind_s and value == "":
            return None
        return value
    except (TypeError, ValueError, AttributeError) as exc:
        if _is_secret(name) or not show:  # never echo a secret, however wrong it is
            raise ConfigError(what, "has an invalid value") from None
        if kind_s.startswith(("timedelta", "datetime")):
            raise ConfigError(what, f"{exc}; got {raw!r}") from None
        expected = kind_s.split(" ")[0]
        raise ConfigError(what, f"expected {expected}, got {raw!r}") from None


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_secret(name: str) -> bool:
    return any(
        f.name == name and (f.metadata["secret"] or f.metadata["secret_url"])
        for f in fields(Settings)
    )


def load_settings(
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Merge TOML file < environment (``INGEST_X`` or ``INGEST_X_FILE``) < ``overrides``
    (flags; None values ignored)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    # Where each setting given came from, for errors that depend on a setting being set at
    # all, whatever its value.
    sources: dict[str, str] = {}
    if config_file is not None:
        from_file = _from_file(Path(config_file))
        values.update(from_file)
        sources |= {k: f"{config_file}: {k}" for k in from_file}
        for table in _OTHER_TABLES & from_file.keys():
            sources[table] = f"[[{table}]]"
    from_env = _from_environ(env)
    values.update(from_env)
    sources |= {k: _env_source(k, env) for k in from_env}
    by_name = {f.name: f for f in fields(Settings)}
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in by_name:
            raise KeyError(name)
        flag = "--" + name.replace("_", "-")
        values[name] = _convert(name, raw, by_name[name].type, flag)
        sources[name] = flag
    if "topic" in sources and "routes" in sources:
        # Set to its default value too: the routes would silently win over it.
        raise ConfigError(f"{sources['topic']} and {sources['routes']}", _TOPIC_AND_ROUTES)
    if "mqtt_url" in sources and "brokers" in sources:
        raise ConfigError(f"{sources['mqtt_url']} and {sources['brokers']}", _URL_AND_BROKERS)
    return Settings(**values)


def _env_source(name: str, env: Mapping[str, str]) -> str:
    var = _env(name)
    return var if var in env else f"{var}_FILE"


_TOPIC_AND_ROUTES: Final = 'both set; put the topic in a [[routes]] table (format = "json")'
_URL_AND_BROKERS: Final = "both set; put every broker in a [[brokers]] table (url = ...)"

# Top-level tables of the config file that are not settings: each is read by its own loader.
_OTHER_TABLES = frozenset({"routes", "brokers"})

# A [[brokers]] table's keys and the settings they stand for, for that broker.
_BROKER_KEYS: Final = {
    "url": "mqtt_url",
    "username": "mqtt_username",
    "password": "mqtt_password",
    "ca_file": "mqtt_ca_file",
    "cert_file": "mqtt_cert_file",
    "key_file": "mqtt_key_file",
}


def _lists_several(text: str) -> bool:
    """Whether ``text`` lists more than one URL (it does not check them)."""
    try:
        return len(split_mqtt_urls(text)) > 1
    except UrlError:
        return True  # a stray comma: reported by broker_settings, naming the setting


def _broker_entry(k: int, entry: Any) -> tuple[str, dict[str, Any]]:
    where = f"brokers[{k}]"
    if not isinstance(entry, dict):
        raise ConfigError(where, "must be a table")
    unknown = sorted(set(entry) - set(_BROKER_KEYS))
    if unknown:
        raise ConfigError(where, f"unknown key {unknown[0]!r} (known: {', '.join(_BROKER_KEYS)})")
    if "url" not in entry:
        raise ConfigError(where, "url: missing (the broker's mqtt:// or mqtts:// URL)")
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}.{key}", "must be a string")
        values[_BROKER_KEYS[key]] = value
    return where, values


def _broker_setting(where: str, setting: str, values: Mapping[str, Any]) -> str:
    """Which setting of which broker an error is about: ``brokers[1].ca_file`` when that
    broker set it, ``INGEST_MQTT_CA_FILE for brokers[1]`` when it came from the settings."""
    for key, name in _BROKER_KEYS.items():
        if setting == _env(name):
            if name == "mqtt_url" and where.startswith(_env("mqtt_url")):
                return where
            if name in values:
                return f"{where}.{key}"
    return f"{setting} for {where}"


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc}") from None
    nested = isinstance(data.get("ingest"), dict)
    table = data["ingest"] if nested else data
    for key in data:
        if nested and key != "ingest" and key not in _OTHER_TABLES:
            raise ConfigError(
                f"{path}: {key}", "unknown table or setting (settings go in [ingest])"
            )
    by_name = {f.name: f for f in fields(Settings)}
    # [[routes]] and [[brokers]]: arrays of tables, carried as JSON (a string is the JSON).
    tables = {
        name: json.dumps(data[name], default=str)
        for name in _OTHER_TABLES
        if name in data and not isinstance(data[name], str)
    }
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = key.replace("-", "_")
        if not nested and name in tables:
            continue
        if name not in by_name:
            raise ConfigError(f"{path}: {key}", "unknown setting")
        values[name] = _convert(name, raw, by_name[name].type, f"{path}: {key}")
    values |= tables
    return values


def _from_environ(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(Settings):
        var = str(f.metadata["env"])
        file_var = f"{var}_FILE"
        if var in env and file_var in env:
            raise ConfigError(f"{var} and {file_var}", "both are set; set only one")
        if var in env:
            values[f.name] = _convert(f.name, env[var], f.type, var)
        elif file_var in env:
            raw = _read_value_file(file_var, env[file_var])
            values[f.name] = _convert(f.name, raw, f.type, file_var, show=False)
    return values


def _read_value_file(var: str, path: str) -> str:
    """A value mounted as a file (Docker and Kubernetes secrets): its text without the one
    trailing newline editors and ``echo`` add. Errors name the variable and the path, never
    what the file holds."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(var, f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(
            var, f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    return text.removesuffix("\n").removesuffix("\r")


def worker_environ(settings: Settings, inherited: Mapping[str, str]) -> dict[str, str]:
    """The environment of a worker process: ``inherited`` without any ``INGEST_<NAME>`` or
    ``INGEST_<NAME>_FILE`` of a setting (a file and its value would clash), plus the
    settings as resolved here (``Settings.to_environ``)."""
    ours = {str(f.metadata["env"]) for f in fields(Settings)}
    ours |= {f"{var}_FILE" for var in ours}
    return {
        **{k: v for k, v in inherited.items() if k not in ours},
        **settings.to_environ(),
    }


# --------------------------------------------------------------------------- documentation
# The README's configuration table, ``--help`` and ingest.example.toml are all written from the
# fields' metadata, so a setting is described in exactly one place.

MARKDOWN_BEGIN = "<!-- settings:begin (generated by `python -m ingest.settings --markdown`) -->"
MARKDOWN_END = "<!-- settings:end -->"


def default_text(f: dataclasses.Field[Any]) -> str:
    """How a field's default reads for people: ``1d``, ``unset``, ``ingest-<hostname>``."""
    if f.metadata["shown"] is not None:
        return str(f.metadata["shown"])
    if f.default is None:
        return "unset"
    return _format_value(f.default)


def help_text(f: dataclasses.Field[Any]) -> str:
    """The one-line help of ``--help``: the text without Markdown, then variable and default."""
    plain = str(f.metadata["help"]).replace("`", "")
    return f"{plain} [env {f.metadata['env']}; default {default_text(f).replace('`', '')}]"


def _groups() -> dict[str, list[dataclasses.Field[Any]]]:
    groups: dict[str, list[dataclasses.Field[Any]]] = {}
    for f in fields(Settings):
        groups.setdefault(str(f.metadata["group"]), []).append(f)
    return groups


def settings_markdown() -> str:
    """The README table: one per group, variable, meaning and default."""
    lines = [MARKDOWN_BEGIN]
    for group, members in _groups().items():
        lines += ["", f"**{group}**", "", "| variable | meaning | default |", "| --- | --- | --- |"]
        for f in members:
            shown = default_text(f)
            if f.metadata["shown"] is None and f.default is not None:
                shown = f"`{shown}`"
            lines.append(f"| `{f.metadata['env']}` | {f.metadata['help']} | {shown} |")
    lines += ["", MARKDOWN_END]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | datetime):
        return _format_value(value)  # a TOML number or offset date-time, unquoted
    if isinstance(value, timedelta):
        value = format_duration(value)
    return json.dumps(str(value), ensure_ascii=False)


def example_toml() -> str:
    """ingest.example.toml: every setting commented out, with its help and default."""
    lines = [
        "# iot-ingest settings: `ingest run --config ingest.toml`. Every setting, commented out,",
        "# with its default. Flags override INGEST_* variables, which override this file;",
        "# INGEST_<NAME>_FILE reads a variable's value from a file (secrets).",
        "# Generated by `python -m ingest.settings --toml`: edit the help in ingest/settings.py.",
        "",
        "[ingest]",
    ]
    for group, members in _groups().items():
        lines += ["", f"# ---- {group}"]
        for f in members:
            lines += ["", *_toml_comment(help_text(f))]
            if f.default is None or f.default_factory is not dataclasses.MISSING:
                value = f.metadata["example"] if f.default is None else default_text(f).strip("`")
                lines.append(f"# {f.name} = {_toml_value(value)}")
            else:
                lines.append(f"# {f.name} = {_toml_value(f.default)}")
    return "\n".join(lines) + "\n"


def _toml_comment(text: str, width: int = 96) -> list[str]:
    wrapped = textwrap.wrap(text, width - 2, break_long_words=False, break_on_hyphens=False)
    return ["# " + line for line in wrapped]


def _main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(settings_markdown())
    elif argv == ["--toml"]:
        sys.stdout.write(example_toml())
    else:
        sys.stderr.write("usage: python -m ingest.settings --markdown | --toml\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
