"""PostgreSQL from a directory of binaries: by default the ones inside the ``pgserver`` wheel.

* :class:`PostgresServer`: ``initdb`` + ``pg_ctl`` from a directory of PostgreSQL binaries,
  by default the ones inside the ``pgserver`` wheel (PostgreSQL 16). PostgreSQL refuses to run
  as root: as root the server runs as user ``postgres`` when there is one, else as a system
  user ``pgserver`` that is created for it (what the ``pgserver`` package itself does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import asyncpg

from ingest.devservers._process import (
    START_TIMEOUT,
    EmbeddedServerError,
    _is_root,
    _read,
    _tail,
    _track,
    _untrack,
    local_servers_allowed,
)
from ingest.devservers.ports import free_port

__all__ = [
    "PGSERVER_USER",
    "PostgresServer",
    "find_postgres_bindir",
    "local_postgres_bindir",
    "pgserver_bindir",
    "run_sql",
    "ssl_supported",
]

PGSERVER_USER = "pgserver"

T = TypeVar("T")


def pgserver_bindir() -> Path | None:
    """The PostgreSQL binaries inside the installed ``pgserver`` wheel (found without importing
    it: its import sets up lock files in the user's runtime directory)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if _has_postgres(bindir) else None


def local_postgres_bindir() -> Path | None:
    """The binaries of a PostgreSQL installed on this machine: PATH first, then the usual
    Debian and RHEL folders (newest version first); None when ``INGEST_TEST_LOCAL_SERVERS`` is
    ``0`` (to prove the fallbacks on a machine that has one)."""
    if not local_servers_allowed():
        return None
    candidates: list[Path] = []
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(Path(pg_ctl).resolve().parent)

    def version(p: str) -> float:
        digits = "".join(c for c in Path(p).parent.name.split("-")[-1] if c.isdigit() or c == ".")
        try:
            return float(digits)
        except ValueError:
            return 0.0

    found = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin")
    candidates += [Path(p) for p in sorted(found, key=version, reverse=True)]
    return next((bindir for bindir in candidates if _has_postgres(bindir)), None)


def find_postgres_bindir() -> Path | None:
    """pgserver's binaries, else a PostgreSQL installed on this machine."""
    return pgserver_bindir() or local_postgres_bindir()


@functools.cache
def ssl_supported(bindir: Path) -> bool:
    """The PostgreSQL in ``bindir`` was built with OpenSSL (``ssl = on`` can work); the
    pgserver wheel's was not."""
    try:
        r = subprocess.run(
            [str(bindir / "pg_config"), "--configure"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
    except OSError:
        return False
    return "--with-openssl" in r.stdout


def _has_postgres(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def _postgres_account() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: ourselves, or as root an unprivileged system user."""
    if not _is_root():
        return None
    for name in ("postgres", PGSERVER_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise EmbeddedServerError(
            "PostgreSQL cannot run as root and there is no user 'postgres' to run it as; "
            f"create one, or a user {PGSERVER_USER!r} (useradd is missing here)"
        )
    r = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home",
         "--shell", "/usr/sbin/nologin", PGSERVER_USER],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0 and "already exists" not in r.stderr:
        raise EmbeddedServerError(f"useradd {PGSERVER_USER} failed: {r.stderr.strip()}")
    return pwd.getpwnam(PGSERVER_USER)


def _reachable_by_others(path: Path) -> bool:
    """Another user can reach ``path`` (execute bit for others on every parent)."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


_POSTGRES_CONF = """
# iot-ingest embedded server: TCP on the loopback interface only, no Unix socket (its path
# length limit would depend on where the data directory is).
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
max_connections = 100
shared_buffers = 64MB
include_if_exists = 'iot_ingest_port.conf'
"""

_FAST_CONF = """
# Throwaway data: durability against an OS crash does not matter. A process crash
# (stop -m immediate) still keeps every commit: synchronous_commit stays on.
fsync = off
full_page_writes = off
"""


class PostgresServer:
    """A PostgreSQL cluster in ``directory`` (``data/``, ``postgres.log``) on a free port.

    Restartable on the same port; ``start`` on a directory that holds a cluster already
    reuses it. Options:

    * ``bindir``: the binaries (default :func:`find_postgres_bindir`).
    * ``durable=False`` turns fsync off (throwaway data).
    * ``settings``: postgresql.conf settings applied at every start (``{"ssl": "on",
      "ssl_cert_file": "/x/server.crt", ...}``). A setting whose name ends in ``_file`` and
      whose value is an existing file gets a private copy of that file in the data directory,
      owned by the server's user with mode 0600 (PostgreSQL refuses a key file others can
      read, and as root the server runs as another user).
    * ``hba``: pg_hba.conf lines put before initdb's (first match wins), e.g.
      ``"hostssl all all 127.0.0.1/32 cert"``; initdb's own lines trust every local client.
    * ``template``: the data directory of a cluster to copy instead of running initdb (see
      :meth:`create`; initdb is the slow part of a start).
    """

    def __init__(
        self,
        directory: Path,
        *,
        bindir: Path | None = None,
        durable: bool = True,
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] = (),
        template: Path | None = None,
    ) -> None:
        found = bindir or find_postgres_bindir()
        if found is None:
            raise EmbeddedServerError(
                "no PostgreSQL: install the embedded extra (pip install 'iot-ingest[embedded]')"
            )
        self.dir = directory
        self.data = directory / "data"
        self._bindir = found
        self._durable = durable
        self._settings = dict(settings or {})
        self._hba = tuple(hba)
        self._template = template
        self._log = directory / "postgres.log"
        self._account = _postgres_account()
        self._port = 0
        self._running = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._running

    @property
    def bindir(self) -> Path:
        return self._bindir

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self._port}/{dbname}"

    def log_text(self) -> str:
        return _read(self._log)

    # -- running the binaries as the right user --

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self._account is not None:
            kwargs = {
                "user": self._account.pw_uid,
                "group": self._account.pw_gid,
                "extra_groups": [],
            }
        return subprocess.run(
            [str(self._bindir / args[0]), *args[1:]],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            **kwargs,
        )

    def _give_away(self, path: Path) -> None:
        if self._account is None:
            return
        uid, gid = self._account.pw_uid, self._account.pw_gid
        os.chown(path, uid, gid)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

    def _enter_directory(self) -> None:
        """Create the directory; as root, hand it to the server user, who must reach it and
        the binaries."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._account is None:
            return
        self.dir.chmod(0o700)
        for p in self.dir.parents:
            if not p.stat().st_mode & 0o001:
                raise EmbeddedServerError(
                    f"{p} cannot be entered by user {self._account.pw_name!r}, who runs "
                    "PostgreSQL: choose a data directory under one that can (e.g. /tmp)"
                )
        if not _reachable_by_others(self._bindir):
            # The venv is somewhere the server user cannot enter (e.g. /root): use a copy.
            # The binaries find their vendored libraries through the RPATH
            # $ORIGIN/../../../pgserver.libs, so the copy keeps that layout.
            install = self._bindir.parent  # site-packages/pgserver/pginstall
            root = self.dir / "pgcopy"
            copy = root / "pgserver" / "pginstall"
            if not copy.exists():
                shutil.copytree(install, copy, symlinks=True)
                libs = install.parent.parent / "pgserver.libs"
                if libs.is_dir():
                    shutil.copytree(libs, root / "pgserver.libs", symlinks=True)
            self._bindir = copy / "bin"
        self._give_away(self.dir)

    def create(self) -> Self:
        """Create the directory and the cluster unless it exists, without starting it."""
        self._enter_directory()
        if (self.data / "PG_VERSION").exists():
            return self
        if self._template is not None:
            shutil.copytree(self._template, self.data, symlinks=True)
            self._give_away(self.data)
            return self
        r = self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        if r.returncode != 0:
            raise EmbeddedServerError(f"initdb failed:\n{_tail(r.stdout + r.stderr)}")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(_POSTGRES_CONF + ("" if self._durable else _FAST_CONF))
        return self

    def _write_config(self) -> None:
        """The port and ``settings`` (an include of postgresql.conf), and ``hba``."""
        lines = [f"port = {self._port}"]
        for key, value in self._settings.items():
            lines.append(f"{key} = {_quote(self._private_copy(key, value))}")
        conf = self.data / "iot_ingest_port.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._give_away(conf)
        hba, initdb_hba = self.data / "pg_hba.conf", self.data / "pg_hba.conf.initdb"
        if not initdb_hba.exists():
            shutil.copyfile(hba, initdb_hba)
        hba.write_text("".join(f"{line}\n" for line in self._hba) + initdb_hba.read_text())
        self._give_away(hba)

    def _private_copy(self, key: str, value: str) -> str:
        if not key.endswith("_file") or not Path(value).is_file():
            return value
        copy = self.data / f"iot_ingest_{key}"
        shutil.copyfile(value, copy)
        copy.chmod(0o600)
        self._give_away(copy)
        return str(copy)

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run("pg_ctl", "-D", str(self.data), *args)

    def start(self) -> Self:
        if self._running:
            return self
        self.create()
        if (self.data / "postmaster.pid").exists():
            # Left by a run that was killed: that server is ours (same data directory).
            self._pg_ctl("-m", "immediate", "-w", "stop")
        first = self._port == 0
        r: subprocess.CompletedProcess[str] | None = None
        for _ in range(5 if first else 1):
            if first:
                self._port = free_port()
            self._write_config()
            r = self._pg_ctl("-l", str(self._log), "-w", "-t", str(int(START_TIMEOUT)), "start")
            if r.returncode == 0:
                self._running = True
                _track(self)
                return self
            # pg_ctl gave up waiting but the postmaster may still come up later: make sure not.
            self._pg_ctl("-m", "immediate", "-w", "stop")
            if not first or "could not bind" not in self.log_text():
                break
        out = _tail(r.stdout + r.stderr) if r is not None else ""
        raise EmbeddedServerError(
            f"PostgreSQL did not start on port {self._port}:\n{out}\n{_tail(self.log_text())}"
        )

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """``fast``: clean shutdown; ``immediate``: like a crash, recovery on the next start."""
        if not self._running:
            return
        r = self._pg_ctl("-m", mode, "-w", "-t", str(int(START_TIMEOUT)), "stop")
        if r.returncode != 0 and "Is server running?" not in r.stderr:
            if mode == "fast":
                r = self._pg_ctl("-m", "immediate", "-w", "stop")
            if r.returncode != 0 and "Is server running?" not in r.stderr:
                raise EmbeddedServerError(f"pg_ctl stop failed:\n{_tail(r.stdout + r.stderr)}")
        self._running = False

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> Self:
        self.stop(mode)
        return self.start()

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; returns its DSN."""
        exists = _fetchval(self.dsn(), "SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            _fetchval(self.dsn(), f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def close(self) -> None:
        """Stop (fast, else immediate). The directory stays: it belongs to the caller."""
        try:
            self.stop("fast")
        except (EmbeddedServerError, subprocess.TimeoutExpired):
            with contextlib.suppress(Exception):
                self.stop("immediate")
        if (self.data / "postmaster.pid").exists():
            # A start that was interrupted (Ctrl-C) after the postmaster had forked.
            with contextlib.suppress(Exception):
                self._pg_ctl("-m", "immediate", "-w", "stop")
        self._running = False
        _untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresServer {self.dsn()} running={self._running}>"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _in_fresh_loop(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` to completion in a fresh thread and event loop: callers may sit inside a
    running loop (an async test), where asyncio.run would refuse to start."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(work())).result()


def run_sql(dsn: str, *statements: str) -> None:
    """Run admin statements, synchronously, on one connection."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    _in_fresh_loop(run)


def _fetchval(dsn: str, sql: str, *args: Any) -> Any:
    """One statement's first value, synchronously."""

    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return _in_fresh_loop(run)
