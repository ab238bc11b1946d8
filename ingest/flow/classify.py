"""Is a database error worth retrying? Decided here, in one place, for the whole daemon.

Three outcomes, each with one reaction in the writer:

- ``TRANSIENT``: the database or the path to it is (temporarily) unavailable. Retry the whole
  batch forever with capped jittered backoff; the bounded channel holds the broker back.
- ``ROW``: the data is what the database refuses. Retrying cannot help; narrow the batch down
  (bisection over messages) and dead-letter only the messages whose rows are rejected.
- ``FATAL``: a setup problem (schema, permissions, credentials, unknown). Neither retrying nor
  narrowing fixes it; the daemon stops with the SQLSTATE in its message.

Decision table, first match wins (after Telegraf's ``outputs/postgresql`` ``isTempError``)::

    exception                                            class
    ---------------------------------------------------  ---------
    asyncpg client-side DataError (a value it cannot     ROW        (subclasses InterfaceError:
      encode), UnicodeEncodeError (lone surrogate),                  checked before it, never
      OverflowError (int too large for a double)                     retried)
    PostgresError by SQLSTATE:
      class 08 connection exception                      TRANSIENT
      class 53 insufficient resources (too many          TRANSIENT
        connections, disk full, out of memory)
      class 57 operator intervention (admin/crash        TRANSIENT
        shutdown, cannot connect now, query canceled)
      class 40 transaction rollback (serialization,      TRANSIENT
        deadlock), except 40002 (a deferred              ROW
        constraint failing at commit)
      55P03 lock not available                           TRANSIENT
      0A000 cached plan changed (InvalidCachedStatement) TRANSIENT  (asyncpg drops its cache)
      class 22 data exception                            ROW
      class 23 integrity constraint violation            ROW        (the writer intercepts
                                                                     23505 on its COPY fast path
                                                                     first; anywhere else a
                                                                     unique violation is data)
      class 54 program limit exceeded                    ROW
      42 syntax / undefined object / privilege, 28       FATAL
        authorization, 3D catalog, 3F schema, any other
    asyncpg InternalClientError (protocol error,         TRANSIENT
      outdated schema cache, target_session_attrs)
    asyncpg InterfaceError saying the connection or      TRANSIENT
      pool is closed/closing, or that the connection
      was released back to the pool (asyncpg hands a
      connection the server dropped back to its pool
      at once, and its proxy refuses every later call;
      the daemon never uses one it released itself);
      any other InterfaceError                           FATAL      (client misuse, config)
    ssl.SSLCertVerificationError (wrong root             FATAL      (an OSError, but a setup one)
      certificate, hostname mismatch), any other
      ssl.SSLError (a protocol or cipher the server
      refuses, a client certificate it rejects, a
      file that holds no certificate)
    ssl.SSLEOFError, SSLZeroReturnError,                 TRANSIENT  (the connection dropped
      SSLSyscallError                                                mid-handshake)
    ConnectionError "rejected SSL upgrade" (the DSN      FATAL      (the server runs without TLS)
      asks for TLS, the server has it off)
    OSError (ConnectionError, refused, reset, DNS),      TRANSIENT
      TimeoutError (asyncio timeouts included)
    anything else (TypeError, ValueError, bugs, ...)     FATAL
"""

from __future__ import annotations

import enum
import ssl

import asyncpg
from asyncpg.exceptions._base import DataError as ClientDataError

__all__ = ["ErrorClass", "classify", "sqlstate_of"]


class ErrorClass(enum.Enum):
    TRANSIENT = "transient"
    ROW = "row"
    FATAL = "fatal"


_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "40"})
_ROW_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})
_TRANSIENT_SQLSTATES = frozenset({"55P03"})
_ROW_SQLSTATES = frozenset({"40002"})
# TLS errors that say the connection went away, not that the setup is wrong.
_SSL_DROPPED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE a server error carries, or None (client-side and OS errors)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        return state if isinstance(state, str) and state else None
    return None


def classify(exc: BaseException) -> ErrorClass:
    """Sort ``exc`` into TRANSIENT, ROW or FATAL (see the module docstring for the table)."""
    # Client-side encoding failures first: asyncpg's DataError is an InterfaceError, and a
    # broad "InterfaceError is transient" rule would retry a bad row forever.
    if isinstance(exc, ClientDataError | UnicodeEncodeError | OverflowError):
        return ErrorClass.ROW
    if isinstance(exc, asyncpg.PostgresError):
        return _classify_sqlstate(exc)
    if isinstance(exc, asyncpg.InternalClientError):
        return ErrorClass.TRANSIENT
    if isinstance(exc, asyncpg.InterfaceError):
        message = str(exc).lower()
        if "closed" in message or "closing" in message or "released back to the pool" in message:
            return ErrorClass.TRANSIENT
        return ErrorClass.FATAL
    if isinstance(exc, ssl.SSLError):
        return ErrorClass.TRANSIENT if isinstance(exc, _SSL_DROPPED) else ErrorClass.FATAL
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return ErrorClass.FATAL
    if isinstance(exc, OSError | TimeoutError):
        return ErrorClass.TRANSIENT
    return ErrorClass.FATAL


def _classify_sqlstate(exc: asyncpg.PostgresError) -> ErrorClass:
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        return ErrorClass.TRANSIENT
    state = sqlstate_of(exc)
    if state is None:
        return ErrorClass.FATAL
    if state == "23514" and "violates partition constraint" in str(exc):
        # Not the row's fault: it was routed to a partition (the default one) while another
        # session was creating its day's partition. Retrying routes it anew.
        return ErrorClass.TRANSIENT
    if state in _ROW_SQLSTATES:
        return ErrorClass.ROW
    if state in _TRANSIENT_SQLSTATES or state[:2] in _TRANSIENT_SQLSTATE_CLASSES:
        return ErrorClass.TRANSIENT
    if state[:2] in _ROW_SQLSTATE_CLASSES:
        return ErrorClass.ROW
    return ErrorClass.FATAL
