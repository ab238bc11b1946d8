"""Errors raised by iot-ingest.

All of them derive from one root so callers can catch the package's errors in one place::

    IngestError
    ├── ConfigError          a setting is missing or invalid (exit status 2)
    ├── DecodeError          a message cannot be turned into readings (becomes a dead letter;
    │                        returned by ``decode``, never raised out of the pipeline)
    ├── MigrationError       a migration file failed to apply
    └── FatalError           the daemon cannot go on (permission denied, missing table, ...)

Whether a database error is worth retrying is decided in one place:
``ingest.flow.classify.classify``. How an error that stops a command is told to the operator
is decided here, by :func:`root_cause` and :func:`describe_root`: one line naming what went
wrong at the bottom, not the wrappers (task groups, ``raise ... from``) it travelled through.
"""

from __future__ import annotations

import asyncio


class IngestError(Exception):
    """Root of every error raised by iot-ingest.

    ``where`` optionally names what was being done (``migration 0003_dashboard``): when the
    error wraps a deeper cause, :func:`describe_root` puts it in front of the root's message.
    """

    where: str | None = None


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
        self.where = f"migration {version}"


class FatalError(IngestError):
    """An error the daemon cannot recover from by retrying; it stops with this message."""


def root_cause(exc: BaseException) -> BaseException:
    """The error at the bottom of ``exc``: out of exception groups (anyio task groups wrap
    what their tasks raise) and down the ``raise ... from`` chain.

    In a group, the first error that is not a cancellation is followed: a task group cancels
    the sibling tasks of the one that failed, and their cancellations say nothing.
    """
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        exc = _step(exc)
    return exc


def describe_root(exc: BaseException) -> str:
    """One line for the operator: the root cause's message, with the SQLSTATE of a database
    error (``permission denied for table t (SQLSTATE 42501)``). Errors of this package speak
    for themselves; anything else is named by its type too (``ConnectionRefusedError: ...``).
    """
    root = root_cause(exc)
    message = " ".join(str(root).split())  # one line, whatever the server sent
    state = getattr(root, "sqlstate", None)  # asyncpg's server errors carry it
    if isinstance(state, str) and state:
        text = f"{message or type(root).__name__} (SQLSTATE {state})"
    elif isinstance(root, IngestError) and message:
        return message
    else:
        text = f"{type(root).__name__}: {message}" if message else type(root).__name__
    where = _where(exc, root)
    return f"{where}: {text}" if where else text


def _where(exc: BaseException, root: BaseException) -> str | None:
    """The ``where`` of the first error of this package on the way from ``exc`` to ``root``."""
    seen: set[int] = set()
    while exc is not root and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, IngestError) and exc.where:
            return exc.where
        exc = _step(exc)
    return None


def _step(exc: BaseException) -> BaseException:
    """One step of :func:`root_cause`: into a group, or down the ``raise ... from`` chain."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not _is_cancellation(e)] or list(exc.exceptions)
        return leaves[0]
    return exc.__cause__ if exc.__cause__ is not None else exc


def _is_cancellation(exc: BaseException) -> bool:
    # anyio's cancel scopes cancel with asyncio's CancelledError: a consequence, not a cause.
    return isinstance(exc, asyncio.CancelledError)
