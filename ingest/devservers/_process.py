"""What every server runner shares: the error type, the registry of servers still running
(stopped by an atexit hook) and reading a log file's tail."""

from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path
from typing import Protocol

from ingest.errors import IngestError

START_TIMEOUT = 30.0

# Set to 0 to ignore local server binaries (to prove the fallbacks on a machine that has them).
LOCAL_SERVERS_ENV = "INGEST_TEST_LOCAL_SERVERS"


class EmbeddedServerError(IngestError):
    """A server did not start or stop; the message carries the tail of its log."""


class _Server(Protocol):
    def close(self) -> None: ...


_live: set[_Server] = set()
_atexit_registered = False


def _track(server: _Server) -> None:
    # Registered at the first start, not at import: atexit runs hooks last-in first-out, so
    # servers stop before the hooks of whoever created their directories delete them.
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True
    _live.add(server)


def _untrack(server: _Server) -> None:
    _live.discard(server)


def _close_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.close()


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _is_root() -> bool:
    return os.geteuid() == 0


def local_servers_allowed() -> bool:
    """Whether server binaries installed on this machine may be used (see LOCAL_SERVERS_ENV)."""
    return os.environ.get(LOCAL_SERVERS_ENV, "1") != "0"
