"""``ingest demo``: a short run on the embedded servers, and a Ctrl-C in the middle of one.

The demo brings its own servers (pgserver; mosquitto from PATH, else iotcore), so these tests
need the embedded extra, not the server fixtures. "Nothing left running" is checked on /proc:
no process may have its command line or working directory in the demo's data directory.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from ingest import devservers as _embedded

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _needs_embedded() -> None:
    missing = [
        name
        for name, ok in (
            ("pgserver", _embedded.pgserver_bindir() is not None),
            ("iotcore or mosquitto", _embedded.iotcore_available() or _embedded.find_mosquitto()),
        )
        if not ok
    ]
    if missing:
        reason = f"ingest demo needs {' and '.join(missing)} (pip install -e '.[test]')"
        if os.environ.get("INGEST_REQUIRE_SERVICES") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the PostgreSQL user can enter when we are root (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="test-demo-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _processes_in(directory: Path) -> list[str]:
    """Processes whose command line mentions ``directory`` or that run inside it."""
    found = []
    needle = str(directory)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # gone meanwhile, or not ours to look at
        if needle in cmdline or cwd == needle or cwd.startswith(needle + "/"):
            found.append(f"{proc.name}: {cmdline.strip()} (cwd {cwd})")
    return found


def _demo(*args: str, tmp: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["TMPDIR"] = str(tmp)  # the default data dir lands here, where we can look for it
    return subprocess.Popen(
        [sys.executable, "-m", "ingest", "demo", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_short_demo_writes_readings_and_leaves_nothing_running(workdir: Path) -> None:
    tmp_path = workdir
    data = tmp_path / "demo"
    proc = _demo("--duration", "5", "--devices", "5", "--data-dir", str(data), tmp=tmp_path)
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Summary" in out, out
    written = re.search(r"written\s+([\d,]+) readings", out)
    assert written is not None and int(written[1].replace(",", "")) > 0, out
    published = re.search(r"published\s+([\d,]+) messages", out)
    assert published is not None and int(published[1].replace(",", "")) > 0, out
    assert "Devices seen: 5" in out, out
    assert "Readings per metric:" in out and "temperature" in out, out
    assert "Latest values of dev-00001" in out, out
    assert "published" in err and "written" in err, err  # the progress line
    assert _processes_in(data) == []
    assert (data / "postgres" / "data" / "PG_VERSION").exists()  # --data-dir keeps the data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # nothing written elsewhere


def test_ctrl_c_mid_run_stops_everything_and_removes_the_temp_dir(workdir: Path) -> None:
    tmp_path = workdir
    proc = _demo("--duration", "60", "--devices", "5", tmp=tmp_path)
    try:
        (data,) = _wait_for(lambda: list(tmp_path.glob("ingest-demo-*")), 30)
        _wait_for(lambda: (data / "simulator.log").exists(), 90)  # the fleet is running
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "interrupted" in err, err
    assert "Summary" in out, out  # the first Ctrl-C still drains and reports
    assert _processes_in(data) == []
    assert list(tmp_path.iterdir()) == []


def _wait_for(probe: Callable[[], T], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s")
