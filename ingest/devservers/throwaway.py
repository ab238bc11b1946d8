"""Throwaway servers for the tests and the benchmarks, all under one process-wide temp dir.

Each server lives in a folder of its own under that dir, listens on a free 127.0.0.1 port and
keeps it across restarts; ``close()`` stops it and deletes its folder, and whatever is still
running at interpreter exit is stopped by an atexit hook, so a failing or interrupted session
leaves nothing behind. Nothing is written outside the temp dir.

* :class:`Mosquitto`: a local ``mosquitto`` (:class:`~ingest.devservers.brokers.MosquittoBroker`:
  project config, ``overrides``, extra ``listeners`` such as TLS, ``password_file``,
  ``acl_file``, ``allow_anonymous``; ``ports`` lists what it bound).
* :class:`PostgresCluster`: a local PostgreSQL (:class:`~ingest.devservers.postgres.
  PostgresServer`: fsync off, ``settings`` for postgresql.conf, ``hba`` lines), copied from one
  initdb per process and binary folder.
* :class:`EmbeddedPostgres`, :class:`EmbeddedBroker`: the same from the wheels of the test
  extra (pgserver, iotcore), for a machine with nothing but Python. iotcore keeps no sessions
  or queued messages across a restart, ignores Receive Maximum and speaks MQTT 3.1.1 only.

``MosquittoFactory`` and ``PostgresFactory`` are the types of the tests' fixtures of the same
names (tests/conftest.py).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ingest.devservers._process import EmbeddedServerError
from ingest.devservers.brokers import (
    Broker,
    IotcoreBroker,
    Listener,
    MosquittoBroker,
    find_mosquitto,
    iotcore_available,
)
from ingest.devservers.postgres import (
    PostgresServer,
    local_postgres_bindir,
    pgserver_bindir,
    run_sql,
)

__all__ = [
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "Listener",
    "Mosquitto",
    "MosquittoFactory",
    "PostgresCluster",
    "PostgresFactory",
    "embedded_broker_available",
    "embedded_postgres_available",
    "find_mosquitto",
    "local_postgres_bindir",
    "run_sql",
]


class MosquittoFactory(Protocol):
    """The ``mosquitto_factory`` fixture: a started :class:`Mosquitto`, closed at test end."""

    def __call__(
        self,
        overrides: Mapping[str, str] | None = None,
        *,
        listeners: Sequence[Listener] = (),
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
    ) -> Broker: ...


class PostgresFactory(Protocol):
    """The ``postgres_factory`` fixture: a started :class:`PostgresCluster`, closed at test
    end."""

    def __call__(
        self, *, settings: Mapping[str, str] | None = None, hba: Sequence[str] = ()
    ) -> PostgresCluster: ...


_root: Path | None = None


def _root_dir() -> Path:
    """The process-wide temp dir; every server lives in a subdirectory of it."""
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="iot-ingest-servers-"))
        # Postgres runs as another user when we are root: it must be able to traverse to its dir.
        _root.chmod(0o755)
        # Registered before any server starts, so it runs after the hook that stops them.
        atexit.register(shutil.rmtree, _root, ignore_errors=True)
    return _root


def _folder(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_root_dir()))


# --- brokers -----------------------------------------------------------------------------------


class Mosquitto(MosquittoBroker):
    """A :class:`MosquittoBroker` (same arguments) in a folder of the process-wide temp dir."""

    def __init__(
        self,
        overrides: Mapping[str, str] | None = None,
        *,
        listeners: Sequence[Listener] = (),
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        super().__init__(
            _folder("mosquitto-"),
            overrides=overrides,
            listeners=listeners,
            password_file=password_file,
            acl_file=acl_file,
            allow_anonymous=allow_anonymous,
        )

    def close(self) -> None:
        """Stop (SIGKILL: nothing of it is kept) and delete the directory."""
        self.kill()
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


def embedded_broker_available() -> bool:
    return iotcore_available()


class EmbeddedBroker(IotcoreBroker):
    """rumqttd from the iotcore wheel with the project's in-flight window, in a folder of the
    process-wide temp dir. ``persistent`` is False: a restart loses sessions and queues."""

    def __init__(self) -> None:
        super().__init__(_folder("iotcore-"))

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- PostgreSQL --------------------------------------------------------------------------------


@functools.cache
def _template(bindir: Path) -> tuple[Path, Path]:
    """One initdb per process and binaries: (its data directory, the binaries it ran with)."""
    server = PostgresServer(_folder("pg-template-"), bindir=bindir, durable=False).create()
    return server.data, server.bindir


# Lighter than the embedded server's default: a test session may run several clusters at once.
_THROWAWAY_SETTINGS = {"shared_buffers": "32MB"}


class PostgresCluster(PostgresServer):
    """A throwaway :class:`PostgresServer` (fsync off) from the local binaries, or ``bindir``,
    in a folder of the process-wide temp dir; ``settings`` and ``hba`` as there."""

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] = (),
        bindir: Path | None = None,
    ) -> None:
        found = bindir or local_postgres_bindir()
        if found is None:
            raise EmbeddedServerError("no initdb/pg_ctl (PATH, /usr/lib/postgresql/*/bin)")
        template, binaries = _template(found)
        super().__init__(
            _folder("pg-"),
            bindir=binaries,
            durable=False,
            settings={**_THROWAWAY_SETTINGS, **(settings or {})},
            hba=hba,
            template=template,
        )

    def close(self) -> None:
        """Stop (immediately: the data is thrown away) and delete the directory."""
        try:
            self.stop("immediate")
        finally:
            super().close()
            shutil.rmtree(self.dir, ignore_errors=True)


def embedded_postgres_available() -> bool:
    return pgserver_bindir() is not None


class EmbeddedPostgres(PostgresCluster):
    """A :class:`PostgresCluster` of PostgreSQL 16 from the pgserver wheel."""

    def __init__(
        self, *, settings: Mapping[str, str] | None = None, hba: Sequence[str] = ()
    ) -> None:
        bindir = pgserver_bindir()
        if bindir is None:
            raise EmbeddedServerError("the pgserver wheel is not installed")
        super().__init__(settings=settings, hba=hba, bindir=bindir)
