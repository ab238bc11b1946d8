"""Settings: frozen, keyword-only, validated at construction.

Precedence (DESIGN.md §2): command-line flags > ``INGEST_*`` environment variables > the
optional TOML file given with ``--config``. Every field has one documented default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ingest.errors import ConfigError

__all__ = [
    "MqttEndpoint",
    "Settings",
    "format_duration",
    "load_settings",
    "parse_duration",
    "parse_retention",
    "parse_time",
    "redact_url",
]

_PROTOCOLS = ("3.1.1", "5")
_LOG_FORMATS = ("auto", "json", "text")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _default_client_id() -> str:
    return f"ingest-{socket.gethostname()}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the daemon can be told. ``env`` metadata names the environment variable."""

    database_url: str | None = field(default=None, metadata={"env": "INGEST_DATABASE_URL"})
    mqtt_url: str = field(default="mqtt://localhost:1883", metadata={"env": "INGEST_MQTT_URL"})
    mqtt_protocol: str = field(default="3.1.1", metadata={"env": "INGEST_MQTT_PROTOCOL"})
    topic: str = field(default="devices/{device_id}/telemetry", metadata={"env": "INGEST_TOPIC"})
    client_id: str = field(default_factory=_default_client_id, metadata={"env": "INGEST_CLIENT_ID"})
    share_group: str | None = field(default=None, metadata={"env": "INGEST_SHARE_GROUP"})
    mqtt_keepalive: int = field(default=15, metadata={"env": "INGEST_MQTT_KEEPALIVE"})
    # The most unacknowledged messages the broker may have in flight to us (v5: our Receive
    # Maximum; 3.1.1: what the broker's max_inflight_messages is expected to be). Batches never
    # wait for more messages than this; a smaller broker window is detected and warned about.
    mqtt_inflight: int = field(default=10000, metadata={"env": "INGEST_MQTT_INFLIGHT"})
    # v5 only: how long the broker keeps our session (and its queue) while we are away.
    mqtt_session_expiry: int = field(
        default=7 * 24 * 3600, metadata={"env": "INGEST_MQTT_SESSION_EXPIRY"}
    )
    channel_capacity: int = field(default=2000, metadata={"env": "INGEST_CHANNEL_CAPACITY"})
    batch_max_rows: int = field(default=5000, metadata={"env": "INGEST_BATCH_MAX_ROWS"})
    batch_max_delay: float = field(default=0.02, metadata={"env": "INGEST_BATCH_MAX_DELAY"})
    db_pool_size: int = field(default=3, metadata={"env": "INGEST_DB_POOL_SIZE"})
    db_connect_timeout: float = field(default=10.0, metadata={"env": "INGEST_DB_CONNECT_TIMEOUT"})
    db_write_timeout: float = field(default=30.0, metadata={"env": "INGEST_DB_WRITE_TIMEOUT"})
    retry_max_delay: float = field(default=10.0, metadata={"env": "INGEST_RETRY_MAX_DELAY"})
    shutdown_timeout: float = field(default=30.0, metadata={"env": "INGEST_SHUTDOWN_TIMEOUT"})
    stats_interval: float = field(default=30.0, metadata={"env": "INGEST_STATS_INTERVAL"})
    metrics_port: int = field(default=9600, metadata={"env": "INGEST_METRICS_PORT"})
    # Loopback by default: the listener has no authentication. The container image sets 0.0.0.0.
    metrics_host: str = field(default="127.0.0.1", metadata={"env": "INGEST_METRICS_HOST"})
    ready_max_lag: float = field(default=30.0, metadata={"env": "INGEST_READY_MAX_LAG"})
    log_level: str = field(default="INFO", metadata={"env": "INGEST_LOG_LEVEL"})
    log_format: str = field(default="auto", metadata={"env": "INGEST_LOG_FORMAT"})
    migrate: bool = field(default=True, metadata={"env": "INGEST_MIGRATE"})
    workers: int = field(default=1, metadata={"env": "INGEST_WORKERS"})
    # Dashboard database (ingest/db/partitions.py, ingest/db/dashboard.py): how long raw readings and
    # one-minute rollups are kept ("30d", "12w", "36h"; unset: forever), how many days of
    # partitions are created ahead.
    retention: str | None = field(default=None, metadata={"env": "INGEST_RETENTION"})
    rollup_retention: str | None = field(default=None, metadata={"env": "INGEST_ROLLUP_RETENTION"})
    partition_days_ahead: int = field(default=3, metadata={"env": "INGEST_PARTITION_DAYS_AHEAD"})
    # Seconds between two folds of recent batches into the dashboard tables (ingest/db/dashboard.py).
    dashboard_interval: float = field(default=1.0, metadata={"env": "INGEST_DASHBOARD_INTERVAL"})
    # Broker credentials and TLS files (explicit settings win over the URL's user info).
    mqtt_username: str | None = field(default=None, metadata={"env": "INGEST_MQTT_USERNAME"})
    mqtt_password: str | None = field(
        default=None, metadata={"env": "INGEST_MQTT_PASSWORD", "secret": True}
    )
    mqtt_ca_file: str | None = field(default=None, metadata={"env": "INGEST_MQTT_CA_FILE"})
    mqtt_cert_file: str | None = field(default=None, metadata={"env": "INGEST_MQTT_CERT_FILE"})
    mqtt_key_file: str | None = field(default=None, metadata={"env": "INGEST_MQTT_KEY_FILE"})
    mqtt_key_password: str | None = field(
        default=None, metadata={"env": "INGEST_MQTT_KEY_PASSWORD", "secret": True}
    )
    # Limits on what one device message may cost (docs/design.md, Limits).
    max_payload_bytes: int = field(default=1048576, metadata={"env": "INGEST_MAX_PAYLOAD_BYTES"})
    max_readings_per_message: int = field(
        default=10000, metadata={"env": "INGEST_MAX_READINGS_PER_MESSAGE"}
    )
    max_ts_ahead: timedelta = field(
        default=timedelta(days=1), metadata={"env": "INGEST_MAX_TS_AHEAD"}
    )
    min_ts: datetime = field(
        default=datetime(2000, 1, 1, tzinfo=UTC), metadata={"env": "INGEST_MIN_TS"}
    )
    max_text_bytes: int = field(default=1024, metadata={"env": "INGEST_MAX_TEXT_BYTES"})
    dead_letter_retention: timedelta | None = field(
        default=timedelta(days=30), metadata={"env": "INGEST_DEAD_LETTER_RETENTION"}
    )
    # Set by the supervisor for each worker process (the ``worker`` label of its metrics).
    worker_id: str | None = field(default=None, metadata={"env": "INGEST_WORKER_ID"})

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ConfigError(_env(name), f"must be > 0, got {getattr(self, name)!r}")

        for name in (
            "mqtt_keepalive", "mqtt_inflight", "channel_capacity", "batch_max_rows",
            "db_pool_size", "db_connect_timeout", "db_write_timeout", "retry_max_delay",
            "shutdown_timeout", "stats_interval", "ready_max_lag", "workers",
            "max_payload_bytes", "max_readings_per_message", "max_text_bytes",
        ):  # fmt: skip
            positive(name)
        self._check_limits()
        self._check_mqtt_credentials()
        if self.batch_max_delay < 0:
            raise ConfigError(_env("batch_max_delay"), "must be >= 0")
        if self.mqtt_session_expiry < 0:
            raise ConfigError(_env("mqtt_session_expiry"), "must be >= 0")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(_env("metrics_port"), "must be a port number (0 disables)")
        if self.mqtt_protocol not in _PROTOCOLS:
            raise ConfigError(_env("mqtt_protocol"), f"must be one of {', '.join(_PROTOCOLS)}")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigError(_env("log_format"), f"must be one of {', '.join(_LOG_FORMATS)}")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(_env("log_level"), f"must be one of {', '.join(_LOG_LEVELS)}")
        if not self.client_id or len(self.client_id) > 200:
            raise ConfigError(_env("client_id"), "must be 1 to 200 characters")
        if self.share_group is not None and (
            not self.share_group or any(c in self.share_group for c in "/+#")
        ):
            raise ConfigError(_env("share_group"), "must be a non-empty name without / + #")
        if self.database_url is not None:
            parts = urlsplit(self.database_url)
            if parts.scheme not in ("postgresql", "postgres"):
                raise ConfigError(
                    _env("database_url"), "must look like postgresql://user:pass@host:port/db"
                )
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
        self.mqtt_endpoint()  # validates the URL
        self._check_no_plaintext_with_tls_files()
        # Imported here: decode imports settings' error type, not the other way round.
        from ingest.formats.decode import TopicTemplate

        TopicTemplate(self.topic)

    def _check_limits(self) -> None:
        if not isinstance(self.max_ts_ahead, timedelta) or self.max_ts_ahead < timedelta(0):
            raise ConfigError(_env("max_ts_ahead"), "must be a duration >= 0")
        if not isinstance(self.min_ts, datetime) or self.min_ts.utcoffset() is None:
            raise ConfigError(_env("min_ts"), "must be a timezone-aware time (RFC 3339)")
        if self.min_ts.utcoffset() != timedelta(0):
            object.__setattr__(self, "min_ts", self.min_ts.astimezone(UTC))
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
        return MqttEndpoint.parse(self.mqtt_url)

    def to_environ(self) -> dict[str, str]:
        """The settings as ``INGEST_*`` variables that load back to these same settings
        (what a worker process is given). Secrets included: never log this."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and str(f.type).startswith("timedelta"):
                env[_env(f.name)] = "forever"
            elif value is not None:
                env[_env(f.name)] = _format_value(value)
        return env

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with passwords masked, for logs."""
        out = dataclasses.asdict(self)
        for key in ("database_url", "mqtt_url"):
            if out[key]:
                out[key] = redact_url(out[key])
        for f in fields(self):
            if f.metadata.get("secret") and out[f.name] is not None:
                out[f.name] = "***"
        return out


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> MqttEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(
                "INGEST_MQTT_URL", "must look like mqtt://[user:pass@]host[:port] or mqtts://..."
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError("INGEST_MQTT_URL", "has an invalid port") from None
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: never log a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = quote(unquote(parts.username or ""), safe="")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


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


def _convert(name: str, raw: Any, kind: Any, source: str) -> Any:
    """Convert a value from the environment (str) or TOML (typed) to the field's type."""
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
        if _is_secret(name):  # never echo a secret, however wrong it is
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
    return str(value)


def _is_secret(name: str) -> bool:
    return any(f.name == name and f.metadata.get("secret") for f in fields(Settings))


def load_settings(
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Merge TOML file < environment < ``overrides`` (flags; None values ignored)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    by_name = {f.name: f for f in fields(Settings)}
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {path}") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc}") from None
        table = data.get("ingest", data)
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise ConfigError(f"{path}: {key}", "unknown setting")
            values[name] = _convert(name, raw, by_name[name].type, f"{path}: {key}")
    for name, f in by_name.items():
        var = str(f.metadata["env"])
        if var in env:
            values[name] = _convert(name, env[var], f.type, var)
    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in by_name:
            raise KeyError(name)
        flag = "--" + name.replace("_", "-")
        values[name] = _convert(name, raw, by_name[name].type, flag)
    return Settings(**values)
