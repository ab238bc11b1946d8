"""``ingest run`` as a subprocess, watched through its JSON log lines on stderr."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = ["DaemonFailure", "IngestProcess", "run_migrate", "split_ingest_args"]

_DRAINED = re.compile(r"drained: (\d+) received, (\d+) acknowledged, (\d+) rows written")


class DaemonFailure(RuntimeError):
    """The daemon crashed, stalled or timed out; ``excerpt`` is the tail of its log."""

    def __init__(self, what: str, excerpt: str) -> None:
        super().__init__(what)
        self.what = what
        self.excerpt = excerpt


def split_ingest_args(text: str) -> tuple[list[str], dict[str, str]]:
    """``"INGEST_X=1 --workers 2"`` -> (["--workers", "2"], {"INGEST_X": "1"}): leading
    ``NAME=VALUE`` words are environment variables, like ``env(1)``."""
    args: list[str] = []
    env: dict[str, str] = {}
    for word in shlex.split(text):
        name, eq, value = word.partition("=")
        if eq and not args and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            env[name] = value
        else:
            args.append(word)
    return args, env


def _ingest_command() -> list[str]:
    exe = shutil.which("ingest", path=os.path.dirname(sys.executable)) or shutil.which("ingest")
    return [exe] if exe else [sys.executable, "-m", "ingest"]


def _wall(record: Mapping[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(record["ts"])).timestamp()
    except (KeyError, ValueError):
        return time.time()


class IngestProcess:
    """Starts ``ingest run``; records every log line, the latest stats line and the drain line.

    ``INGEST_*`` variables of the caller's environment are not inherited: only ``settings``
    and ``extra_env``, so a stray variable cannot change what is measured.
    """

    def __init__(
        self,
        settings: Mapping[str, str],
        *,
        args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
        env.update(settings)
        env.update(extra_env or {})
        self.command = [*_ingest_command(), "run", *args]
        self.started = time.time()
        self.proc = subprocess.Popen(
            self.command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # our Ctrl-C is for the harness; the daemon gets SIGTERM
        )
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.stats: dict[str, Any] | None = None
        self.first_received_at: float | None = None
        self.subscribed = threading.Event()
        self.drained: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="ingest-stderr", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                record = {"msg": line, "level": "raw"}
            with self._lock:
                self.lines.append(line)
                self.records.append(record)
                msg = str(record.get("msg", ""))
                if msg == "stats":
                    record["_wall"] = _wall(record)
                    self.stats = record
                    if self.first_received_at is None and int(record.get("received", 0)) > 0:
                        self.first_received_at = record["_wall"]
                elif msg.startswith("subscribed to"):
                    self.subscribed.set()
                elif m := _DRAINED.search(msg):
                    self.drained = {
                        "received": int(m[1]),
                        "acknowledged": int(m[2]),
                        "rows": int(m[3]),
                    }

    def excerpt(self, lines: int = 25) -> str:
        with self._lock:
            return "\n".join(self.lines[-lines:])

    def notable(self) -> list[str]:
        """Warning and error lines (for the report: e.g. a broker window warning)."""
        with self._lock:
            return [
                str(r.get("msg"))
                for r in self.records
                if r.get("level") in ("warning", "error", "critical", "raw")
            ]

    def wait_for(
        self,
        done: Callable[[dict[str, Any]], bool],
        *,
        timeout: float,
        stall: float,
        what: str,
    ) -> dict[str, Any]:
        """The first stats line that satisfies ``done``; DaemonFailure when the process exits,
        makes no progress (received, rows) for ``stall`` seconds, or ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        progress: tuple[int, int] | None = None
        progressed = time.monotonic()
        while True:
            with self._lock:
                stats = self.stats
            if stats is not None and done(stats):
                return stats
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise DaemonFailure(
                    f"ingest run exited with status {self.proc.returncode} while {what}",
                    self.excerpt(),
                )
            now = time.monotonic()
            if stats is not None:
                current = (int(stats.get("received", 0)), int(stats.get("rows", 0)))
                if current != progress:
                    progress, progressed = current, now
            if now - progressed > stall:
                raise DaemonFailure(
                    f"ingest run stalled for {stall:.0f}s while {what} (last stats: "
                    f"{_stats_text(stats)})",
                    self.excerpt(),
                )
            if now > deadline:
                raise DaemonFailure(
                    f"ingest run timed out after {timeout:.0f}s while {what} (last stats: "
                    f"{_stats_text(stats)})",
                    self.excerpt(),
                )
            time.sleep(0.02)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


def _stats_text(stats: Mapping[str, Any] | None) -> str:
    if stats is None:
        return "none yet"
    keys = ("received", "rows", "duplicates", "dead_letters", "channel_depth", "unacked")
    return ", ".join(f"{k}={stats.get(k)}" for k in keys)


def run_migrate(dsn: str) -> None:
    """``ingest migrate`` against ``dsn`` (the schema the daemon itself would create)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env |= {"INGEST_DATABASE_URL": dsn, "INGEST_LOG_FORMAT": "json"}
    r = subprocess.run(
        [*_ingest_command(), "migrate"], env=env, capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"ingest migrate failed ({r.returncode}):\n{r.stderr[-2000:]}")
