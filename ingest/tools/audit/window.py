"""The ``--since`` / ``--until`` arguments: RFC 3339, ``now``, or a time ago."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

from ingest.errors import ConfigError

__all__ = ["parse_time", "window"]

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)", re.ASCII)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def parse_time(text: str, *, now: datetime | None = None, setting: str = "--since") -> datetime:
    """An aware UTC datetime from RFC 3339 (``2024-05-01T12:00:00Z``, offset optional: UTC
    when absent; a bare date is its midnight UTC), ``now``, or a time ago: ``90s``, ``15m``,
    ``2h``, ``7d``, ``1w`` (fractions allowed: ``1.5h``). Raises ``ConfigError(setting)``."""
    raw = text.strip()
    now = datetime.now(UTC) if now is None else now
    if raw.lower() == "now":
        return now
    rel = _RELATIVE.fullmatch(raw.lower())
    if rel is not None:
        return now - timedelta(seconds=float(rel.group(1)) * _UNITS[rel.group(2)])
    if _DATE.match(raw):
        iso = raw
        if len(iso) > 10 and iso[10] in "t ":
            iso = f"{iso[:10]}T{iso[11:]}"
        if iso.endswith("z"):
            iso = f"{iso[:-1]}Z"
        try:
            dt = datetime.fromisoformat(iso)
        except ValueError:
            pass
        else:
            return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    raise ConfigError(
        setting,
        f"{text!r} is not a time: use RFC 3339 (2024-05-01T12:00:00Z), 'now', or a time ago "
        "like 90s, 15m, 2h, 7d, 1w",
    )


def window(
    since: str | None, until: str | None, now: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    now = datetime.now(UTC) if now is None else now
    start = parse_time(since, now=now, setting="--since") if since is not None else None
    end = parse_time(until, now=now, setting="--until") if until is not None else None
    if start is not None and end is not None and end <= start:
        raise ConfigError("--until", f"{end.isoformat()} is not after --since {start.isoformat()}")
    return start, end
