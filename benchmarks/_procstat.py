"""CPU seconds and peak memory of processes, read from ``/proc`` (Linux only).

CPU of a process tree = ``utime + stime`` of every live process in it, plus ``cutime +
cstime`` of its root (the children it already reaped: Postgres's short-lived autovacuum
workers, a restarted daemon worker). Children that exited and were reaped by a process that is
itself gone are missed; that does not happen for the trees measured here.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ChildResult",
    "CpuSnapshot",
    "cpu_seconds",
    "descendants",
    "peak_rss_mb",
    "postmaster_pid",
    "run_measured",
]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int | None, *, tree: bool = True) -> float | None:
    """User + system CPU seconds of ``pid`` (and its tree); None when it is gone or unknown."""
    if pid is None:
        return None
    root = _stat_fields(pid)
    if root is None:
        return None
    # fields[0] is field 3 of proc(5): utime is field 14, stime 15, cutime 16, cstime 17.
    ticks = sum(int(root[i]) for i in (11, 12, 13, 14))
    if tree:
        for p in descendants(pid)[1:]:
            f = _stat_fields(p)
            if f is not None:
                ticks += int(f[11]) + int(f[12])
    return ticks / _TICK


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds of named processes at one moment; ``minus`` gives the usage in between."""

    values: dict[str, float | None]

    @classmethod
    def take(cls, pids: dict[str, int | None]) -> CpuSnapshot:
        return cls({name: cpu_seconds(pid) for name, pid in pids.items()})

    def minus(self, earlier: CpuSnapshot) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, value in self.values.items():
            before = earlier.values.get(name, 0.0)
            out[name] = None if value is None or before is None else round(value - before, 2)
        return out


def peak_rss_mb(pid: int, *, tree: bool = True) -> float | None:
    """The largest ``VmHWM`` (peak resident set) among ``pid`` and its descendants, in MiB."""
    best: float | None = None
    for p in descendants(pid) if tree else [pid]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                kib = int(line.split()[1])
                best = max(best or 0.0, kib / 1024)
    return None if best is None else round(best, 1)


def postmaster_pid(data_directory: str | Path) -> int | None:
    """The postmaster's pid from ``postmaster.pid`` (first line); None if unreadable."""
    try:
        first = (Path(data_directory) / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class ChildResult:
    """A finished child: exit status, output, and its CPU time (``wait4``).

    Not its ``ru_maxrss``: Linux carries the parent's peak over fork+exec into it, so the
    children report their own ``VmHWM`` (:func:`peak_rss_mb` of ``os.getpid()``) instead."""

    returncode: int
    stdout: str
    stderr: str
    started: float  # time.time() just before the fork
    cpu_seconds: float
    timed_out: bool


def run_measured(
    command: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> ChildResult:
    """Run ``command`` to completion; its CPU seconds come from ``wait4`` (the child alone)."""
    started = time.time()
    proc = subprocess.Popen(
        list(command),
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        # communicate() reads both pipes to EOF without reaping the child, which we do below
        # with wait4 to get its rusage.
        out_chunks: list[bytes] = []
        err_chunks: list[bytes] = []
        assert proc.stdout is not None and proc.stderr is not None
        err_reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))  # type: ignore[union-attr]
        err_reader.start()
        out_chunks.append(proc.stdout.read())
        err_reader.join()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
    return ChildResult(
        returncode=proc.returncode,
        stdout=b"".join(out_chunks).decode(errors="replace"),
        stderr=b"".join(err_chunks).decode(errors="replace"),
        started=started,
        cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
        timed_out=timed_out.is_set(),
    )
