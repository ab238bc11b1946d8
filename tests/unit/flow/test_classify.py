"""Error classification: real asyncpg exception instances, no sockets."""

from __future__ import annotations

import socket
import ssl

import asyncpg
import pytest
from asyncpg.exceptions._base import DataError as ClientDataError

from ingest.flow.classify import ErrorClass, classify, sqlstate_of

T, R, F = ErrorClass.TRANSIENT, ErrorClass.ROW, ErrorClass.FATAL


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        # connection lost / refused / timed out
        (OSError("network unreachable"), T),
        (ConnectionRefusedError(111, "refused"), T),
        (ConnectionResetError(104, "reset by peer"), T),
        (socket.gaierror(-3, "temporary failure in name resolution"), T),
        (TimeoutError(), T),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle"), T),
        (asyncpg.ConnectionFailureError("connection failure"), T),
        (asyncpg.InterfaceError("connection is closed"), T),
        (asyncpg.InterfaceError("pool is closing"), T),
        (
            asyncpg.InterfaceError(
                "cannot call Connection.transaction(): connection has been released back to "
                "the pool"
            ),
            T,
        ),
        (asyncpg.InternalClientError("protocol confusion"), T),
        (asyncpg.exceptions.OutdatedSchemaCacheError("cache outdated"), T),
        # the server says "not now"
        (asyncpg.CannotConnectNowError("the database system is starting up"), T),
        (asyncpg.TooManyConnectionsError("too many clients"), T),
        (asyncpg.DiskFullError("no space left"), T),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), T),
        (asyncpg.CrashShutdownError("crash"), T),
        (asyncpg.QueryCanceledError("canceling statement"), T),
        (asyncpg.SerializationError("could not serialize access"), T),
        (asyncpg.DeadlockDetectedError("deadlock detected"), T),
        (asyncpg.LockNotAvailableError("could not obtain lock"), T),
        (asyncpg.InvalidCachedStatementError("cached plan must not change result type"), T),
        # the data is refused
        (asyncpg.InvalidTextRepresentationError("invalid input syntax"), R),
        (asyncpg.DatetimeFieldOverflowError("timestamp out of range"), R),
        (asyncpg.CharacterNotInRepertoireError("invalid byte sequence 0x00"), R),
        (asyncpg.NumericValueOutOfRangeError("out of range"), R),
        (asyncpg.CheckViolationError("violates check constraint"), R),
        (asyncpg.NotNullViolationError("null value"), R),
        (asyncpg.ForeignKeyViolationError("fk"), R),
        (asyncpg.UniqueViolationError("duplicate key"), R),
        (asyncpg.TransactionIntegrityConstraintViolationError("deferred check at commit"), R),
        (asyncpg.ProgramLimitExceededError("index row size exceeds maximum"), R),
        (ClientDataError("invalid input for query argument $1"), R),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), R),
        (OverflowError("int too large to convert to float"), R),
        # setup problems and the unknown
        (asyncpg.UndefinedTableError('relation "readings" does not exist'), F),
        (asyncpg.UndefinedColumnError("column does not exist"), F),
        (asyncpg.PostgresSyntaxError("syntax error"), F),
        (asyncpg.InsufficientPrivilegeError("permission denied for table readings"), F),
        (asyncpg.InvalidPasswordError("password authentication failed"), F),
        (asyncpg.InvalidAuthorizationSpecificationError("no pg_hba.conf entry"), F),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), F),
        (asyncpg.InvalidSchemaNameError('schema "x" does not exist'), F),
        (asyncpg.InternalServerError("XX000"), F),
        (asyncpg.PostgresError("no sqlstate"), F),
        (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"), F),
        (asyncpg.exceptions.ClientConfigurationError("invalid DSN"), F),
        (ssl.SSLCertVerificationError("certificate verify failed"), F),
        (ssl.SSLCertVerificationError("Hostname mismatch, certificate is not valid"), F),
        (ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"), F),
        (ssl.SSLError(1, "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl"), F),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), F),
        (ConnectionError('PostgreSQL server at "h:5432" rejected SSL upgrade'), F),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), T),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), T),
        (ssl.SSLSyscallError(5, "Some I/O error occurred"), T),
        (ConnectionError("server sent an error response during SSL exchange"), T),
        (TypeError("must be real number, not str"), F),
        (ValueError("something"), F),
        (RuntimeError("bug"), F),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_classify(exc: BaseException, expected: ErrorClass) -> None:
    assert classify(exc) is expected


def test_client_data_error_is_an_interface_error_but_never_transient() -> None:
    # The trap docs/design.md warns about: asyncpg's client-side DataError subclasses
    # InterfaceError, even when its message mentions a closed connection.
    exc = ClientDataError("connection is closed? no: invalid input for query argument")
    assert isinstance(exc, asyncpg.InterfaceError)
    assert not isinstance(exc, asyncpg.PostgresError)
    assert classify(exc) is ErrorClass.ROW
    # The public name is the server-side SQLSTATE 22000 class, also ROW.
    assert not issubclass(asyncpg.DataError, asyncpg.InterfaceError)
    assert classify(asyncpg.DataError("data exception")) is ErrorClass.ROW


def test_sqlstate_of() -> None:
    assert sqlstate_of(asyncpg.UniqueViolationError("dup")) == "23505"
    assert sqlstate_of(asyncpg.CannotConnectNowError("starting")) == "57P03"
    assert sqlstate_of(OSError("x")) is None
    assert sqlstate_of(ClientDataError("x")) is None


def test_partition_routing_race_is_transient_not_a_bad_row() -> None:
    race = asyncpg.exceptions.CheckViolationError(
        'new row for relation "readings_default" violates partition constraint'
    )
    assert classify(race) is ErrorClass.TRANSIENT
    operator_check = asyncpg.exceptions.CheckViolationError(
        'new row for relation "readings_p20261127" violates check constraint "sane"'
    )
    assert classify(operator_check) is ErrorClass.ROW


def _server_errors(*classes: str) -> list[type[asyncpg.PostgresError]]:
    """Every asyncpg server error type whose SQLSTATE is in one of ``classes``."""
    found = [
        value
        for value in vars(asyncpg.exceptions).values()
        if isinstance(value, type)
        and issubclass(value, asyncpg.PostgresError)
        and str(getattr(value, "sqlstate", "") or "")[:2] in classes
    ]
    return sorted(found, key=lambda t: t.sqlstate)


# Schema, privileges, credentials, catalog, roles: the setup is wrong, not the data. Retrying
# cannot fix it and narrowing a batch would turn every message into a dead letter.
_SETUP = _server_errors("42", "28", "3D", "3F", "0L", "0P")


@pytest.mark.parametrize("error_type", _SETUP, ids=lambda t: f"{t.sqlstate}-{t.__name__}")
def test_setup_errors_are_fatal_never_row_errors(error_type: type[asyncpg.PostgresError]) -> None:
    assert classify(error_type("permission denied or missing")) is ErrorClass.FATAL


def test_the_setup_classes_hold_what_a_lost_privilege_or_login_raises() -> None:
    names = {t.sqlstate for t in _SETUP}
    # 42501 privilege revoked, 42P01 table gone, 28P01 password changed, 28000 pg_hba refuses,
    # 3D000 database gone, 3F000 schema gone, 42883 function gone (a migration undone).
    assert {"42501", "42P01", "28P01", "28000", "3D000", "3F000", "42883"} <= names
    assert len(_SETUP) > 40


@pytest.mark.parametrize("error_type", _server_errors("08"), ids=lambda t: t.sqlstate)
def test_every_connection_exception_is_transient(error_type: type[asyncpg.PostgresError]) -> None:
    assert classify(error_type("connection lost")) is ErrorClass.TRANSIENT
