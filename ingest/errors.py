"""Errors raised by iot-ingest.

All of them derive from one root so callers can catch the package's errors in one place::

    IngestError
    ├── ConfigError          a setting is missing or invalid (exit status 2)
    ├── DecodeError          a message cannot be turned into readings (becomes a dead letter;
    │                        returned by ``decode``, never raised out of the pipeline)
    ├── MigrationError       a migration file failed to apply
    └── FatalError           the daemon cannot go on (permission denied, missing table, ...)

Whether a database error is worth retrying is decided in one place:
``ingest.flow.classify.classify``.
"""

from __future__ import annotations


class IngestError(Exception):
    """Root of every error raised by iot-ingest."""


class ConfigError(IngestError):
    """A setting is missing or invalid. ``setting`` names it (flag/env variable)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class DecodeError(IngestError):
    """A message that cannot be decoded.

    ``reason`` is a short machine-readable cause (``not_json``, ``bad_ts``, ...) used for
    metrics and the ``dead_letters.reason`` column; ``str(error)`` is the human message.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"DecodeError({self.reason!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DecodeError)
            and other.reason == self.reason
            and other.message == self.message
        )

    def __hash__(self) -> int:
        return hash((self.reason, self.message))


class MigrationError(IngestError):
    """A migration failed; ``version`` names the file."""

    def __init__(self, version: str, message: str) -> None:
        super().__init__(f"migration {version}: {message}")
        self.version = version


class FatalError(IngestError):
    """An error the daemon cannot recover from by retrying; it stops with this message."""
