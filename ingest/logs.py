"""Logging set-up: JSON lines when stderr is not a terminal, key=value text when it is.

``INGEST_LOG_FORMAT`` (``auto``, ``json``, ``text``) overrides the choice, ``INGEST_LOG_LEVEL``
sets the level. Extra fields passed with ``log.info(..., extra={"batch": 3, "device_id":
"dev-1"})`` become keys of the JSON object / ``key=value`` pairs. Fields that hold for a whole
stretch of work (the batch being written, so that every line the writer logs meanwhile names
it) are set once with :func:`log_context`.

Secrets never reach the output: the password of every URL (``scheme://user:***@host``) and
every ``password=...`` pair (libpq keyword form, query strings) is masked in the message, in
extra fields and in tracebacks.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["configure_logging", "log_context", "redact"]

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_KEYWORD_PASSWORD = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd)\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&;,'\"]+)", re.IGNORECASE
)
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_CONTEXT: ContextVar[dict[str, Any]] = ContextVar("ingest_log_context", default={})  # noqa: B039 (never mutated)


def redact(text: str) -> str:
    """Mask the password of every URL and every ``password=`` pair in ``text``."""
    text = _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)
    return _KEYWORD_PASSWORD.sub(r"\g<key>***", text)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged by this task (and what it awaits) in the block."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class _ContextFilter(logging.Filter):
    """Copies the :func:`log_context` fields onto the record, in the logging task's context."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: _redacted(v)
        for k, v in record.__dict__.items()
        if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


_BARE = re.compile(r"[^\s\"'=]+")


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """``12:00:00.123 info    ingest.flow.pipeline: message key=value key="two words"``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        parts = [f"{ts} {record.levelname.lower():7} {record.name}: {record.getMessage()}"]
        for key, value in _extras(record).items():
            parts.append(f"{key}={_text_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def configure_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho logs every packet at DEBUG through aiomqtt's logger; keep it at WARNING.
    logging.getLogger("mqtt").setLevel(max(logging.WARNING, root.level))
