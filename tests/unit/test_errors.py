"""How an error that stops a command is told: root_cause and describe_root, no servers."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from ingest.errors import (
    ConfigError,
    DecodeError,
    FatalError,
    IngestError,
    MigrationError,
    describe_root,
    root_cause,
)


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    """``outer`` as ``raise outer from cause`` leaves it."""
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


def denied() -> asyncpg.InsufficientPrivilegeError:
    return asyncpg.InsufficientPrivilegeError("permission denied for table dashboard_pending")


def test_an_error_without_cause_is_its_own_root() -> None:
    error = ValueError("bad")
    assert root_cause(error) is error
    assert describe_root(error) == "ValueError: bad"


def test_raise_from_is_followed_to_the_bottom() -> None:
    bottom = denied()
    middle = raised_from(FatalError("cannot write to the database"), bottom)
    top = raised_from(RuntimeError("worker stopped"), middle)
    assert root_cause(top) is bottom
    assert describe_root(top) == ("permission denied for table dashboard_pending (SQLSTATE 42501)")


def test_an_implicit_context_is_not_a_cause() -> None:
    # `raise X` inside `except` (no `from`) says X is what went wrong at that level.
    try:
        try:
            raise denied()
        except asyncpg.PostgresError:
            raise FatalError("the database refused the schema") from None
    except FatalError as exc:
        caught = exc
    assert root_cause(caught) is caught
    assert describe_root(caught) == "the database refused the schema"


def test_nested_exception_groups_are_unwrapped() -> None:
    # What anyio task groups raise: the failing task's error beside its cancelled siblings,
    # one group inside another, the real error wrapped in a `raise ... from` as well.
    bottom = denied()
    failing = raised_from(FatalError("cannot write to the database"), bottom)
    inner = BaseExceptionGroup("inner", [asyncio.CancelledError(), failing])
    outer = BaseExceptionGroup("unhandled errors in a TaskGroup", [asyncio.CancelledError(), inner])
    assert root_cause(outer) is bottom
    assert describe_root(outer) == (
        "permission denied for table dashboard_pending (SQLSTATE 42501)"
    )


def test_the_first_real_error_of_a_group_wins() -> None:
    first, second = ConnectionRefusedError(111, "Connection refused"), ValueError("later")
    group = ExceptionGroup("two failed", [first, second])
    assert root_cause(group) is first
    assert describe_root(group) == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_a_group_of_cancellations_only_names_a_cancellation() -> None:
    group = BaseExceptionGroup("cancelled", [asyncio.CancelledError(), asyncio.CancelledError()])
    assert isinstance(root_cause(group), asyncio.CancelledError)
    assert describe_root(group) == "CancelledError"


def test_a_cycle_of_causes_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert root_cause(a) in (a, b)


def test_the_sqlstate_of_a_server_error_is_named() -> None:
    undefined = asyncpg.UndefinedTableError('relation "readings" does not exist')
    assert describe_root(undefined) == 'relation "readings" does not exist (SQLSTATE 42P01)'
    # A server message of several lines (DETAIL, a query) is told on one line.
    multi = asyncpg.CheckViolationError('new row violates check constraint "v"\n  DETAIL: x')
    assert (
        describe_root(multi) == 'new row violates check constraint "v" DETAIL: x (SQLSTATE 23514)'
    )
    assert describe_root(asyncpg.InvalidPasswordError("")) == (
        "InvalidPasswordError (SQLSTATE 28P01)"
    )


def test_where_it_happened_is_kept_in_front() -> None:
    failed = raised_from(MigrationError("0003_dashboard", "failed"), denied())
    wrapped = raised_from(FatalError("cannot migrate"), failed)
    assert describe_root(wrapped) == (
        "migration 0003_dashboard: permission denied for table dashboard_pending (SQLSTATE 42501)"
    )
    # Without a deeper cause the error speaks for itself, once.
    alone = MigrationError("0003_dashboard", "file is empty")
    assert describe_root(alone) == "migration 0003_dashboard: file is empty"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ConfigError("INGEST_DATABASE_URL", "not a URL"), "INGEST_DATABASE_URL: not a URL"),
        (DecodeError("not_json", "payload is not JSON"), "payload is not JSON"),
        (FatalError("lost the database for good"), "lost the database for good"),
        (IngestError(), "IngestError"),
        (TimeoutError(), "TimeoutError"),
        (OSError(113, "No route to host"), "OSError: [Errno 113] No route to host"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_one_line_per_kind_of_error(error: BaseException, line: str) -> None:
    assert describe_root(error) == line
