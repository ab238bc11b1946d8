"""Fault suite: each test injects one fault mid-stream and reconciles published vs stored.

Figures (messages published, rows stored, dead letters, messages the daemon received and
readings it counted as duplicates, recovery seconds, peak RSS) are collected in
``fault_report`` and printed at the end of the run (and written to ``$INGEST_FAULT_REPORT`` as
JSON when set). Every one is measured; an empty cell is a figure that does not apply.
``received`` and ``duplicates`` are the daemon's counters at each run's last scrape, summed
over its runs: a run ended by a kill or a signal counts up to its last scrape only. They are
measurements for the closing note, never timed assertions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

_RESULTS: list[dict[str, Any]] = []


@pytest.fixture
def fault_report() -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    yield rows
    _RESULTS.extend(rows)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("fault suite figures")
    cols = [
        "fault",
        "published",
        "rows",
        "dead_letters",
        "received",
        "duplicates",
        "recovery_s",
        "peak_rss_mb",
    ]
    tr.write_line(" | ".join(cols))
    for r in _RESULTS:
        tr.write_line(" | ".join(str(r.get(c, "")) for c in cols))
    if path := os.environ.get("INGEST_FAULT_REPORT"):
        with open(path, "w") as f:
            json.dump(_RESULTS, f, indent=2)
