"""``ingest demo``'s command line, without starting any server."""

from __future__ import annotations

import subprocess
import sys


def test_demo_help_says_what_root_implies() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ingest", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "--duration" in r.stdout and "--data-dir" in r.stdout and "--keep" in r.stdout
    assert "as root" in r.stdout and "system user 'pgserver'" in r.stdout


def test_demo_rejects_a_non_positive_duration() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ingest", "demo", "--duration", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "--duration" in r.stderr
