"""``ingest audit`` and ``ingest replay`` print what devices sent (ids, topics) without letting a
terminal act on it."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter

import pytest

from ingest.tools.audit import AuditResult, DeviceAudit, SeqStats, format_table, reconcile
from ingest.tools.audit.output import visible
from ingest.tools.replay import MOVED, ReplaySummary

HOSTILE = "dev-\x1b[2J\x07\x9b31m\u202eevil\n"


def raw_controls(text: str) -> list[str]:
    """Characters a terminal acts on or hides (the newlines between lines excepted)."""
    return [
        ch
        for line in text.split("\n")
        for ch in line
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
    ]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("dev-00001", "dev-00001"),
        ("caf\u00e9 \u6e29\u5ea6", "caf\u00e9 \u6e29\u5ea6"),  # printable non-ASCII kept
        ("\x1b[2J", "\\x1b[2J"),
        ("a\x00b\x7fc", "a\\x00b\\x7fc"),
        ("\x9b", "\\x9b"),
        ("\u202eevil", "\\u202eevil"),
        ("line\u2028two", "line\\u2028two"),
        ("tab\there\r\n", "tab\\x09here\\x0d\\x0a"),
        ("\U000e0041", "\\U000e0041"),  # a tag character: invisible
    ],
)
def test_visible(text: str, shown: str) -> None:
    assert visible(text) == shown
    assert visible(shown) == shown  # what it prints is left as it is


def test_table_escapes_device_ids_and_dead_letter_reasons() -> None:
    hostile = DeviceAudit(
        HOSTILE,
        rows=15,
        samples=3,
        seq=SeqStats(first=1, last=4, rows=3, repeats=0, gaps=1, missing=1, first_gaps=[(2, 2)]),
    )
    result = AuditResult(
        since=None,
        until=None,
        template="devices/{device_id}/telemetry",
        devices=[DeviceAudit("dev-00001", rows=5, samples=1), hostile],
        unmatched_dead_letters=Counter({"bad\x1b]0;pwned\x07": 1}),
        samples_per_message=1,
    )
    reconcile(result)
    text = format_table(result)
    assert raw_controls(text) == []
    shown = visible(HOSTILE)
    assert f"  {shown}: 1 seq missing in 1 gap(s): 2" in text
    assert "bad\\x1b]0;pwned\\x07 1" in text
    # The escaped id is measured as printed, so the columns stay straight.
    header, first, second = text.splitlines()[1:4]
    rows_end = header.index("ROWS") + len("ROWS")
    assert second.startswith(shown + "  ")
    assert first[:rows_end].endswith(" 5") and second[:rows_end].endswith(" 15")


def test_json_output_escapes_control_characters_too() -> None:
    result = AuditResult(
        since=None,
        until=None,
        template="devices/{device_id}/telemetry",
        devices=[DeviceAudit(HOSTILE, rows=5, samples=1)],
        unmatched_dead_letters=Counter(),
        samples_per_message=1,
    )
    text = json.dumps(result.to_json(), separators=(",", ":"))
    assert raw_controls(text) == [] and "\n" not in text
    assert json.loads(text)["devices"][0]["device_id"] == HOSTILE


def test_replay_summary_escapes_reasons_and_database_errors() -> None:
    summary = ReplaySummary(dry_run=False, examined=1, rejected=1)
    summary.outcomes[("bad\x1b[2J", MOVED)] = 1
    summary.rejection_errors.append(f"value too long for device {HOSTILE!s}")
    text = summary.format()
    assert raw_controls(text) == []
    assert "bad\\x1b[2J" in text and visible(HOSTILE) in text
