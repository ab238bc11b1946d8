"""What a person reads: the table, and one progress line on a terminal while queries run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final, TextIO

import anyio

from ingest.tools.audit.reconcile import reconcile
from ingest.tools.audit.results import DUPLICATES_NOTE, AuditResult, DeviceAudit

__all__ = ["Progress", "format_table", "visible"]

#: Devices shown in the human table before only the ones with problems are listed.
TABLE_DEVICES: Final = 50


class Progress:
    """One status line on stderr while queries run (only on a terminal)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._started = time.monotonic()
        self._pending: dict[str, None] = {}

    def start(self, what: str) -> None:
        self._pending[what] = None

    def done(self, what: str) -> None:
        self._pending.pop(what, None)
        self.show()

    def show(self) -> None:
        if self._stream is None:
            return
        elapsed = time.monotonic() - self._started
        doing = ", ".join(self._pending) or "done"
        self._stream.write(f"\r\x1b[Kaudit: {doing} ({elapsed:.0f}s)")
        if not self._pending:
            self._stream.write("\n")
        self._stream.flush()

    async def ticker(self) -> None:
        if self._stream is None:
            return
        while True:
            await anyio.sleep(1)
            if not self._pending:
                return
            self.show()


def visible(text: str) -> str:
    """``text`` with every character that a terminal would act on or hide (control characters,
    bidirectional overrides, line separators...) written as a Python escape: ``\\x1b``,
    ``\\u202e``. Device ids, metric names and topics come from devices, and an operator's
    terminal must not run what a device sent."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


_HEADER: Final = (
    "DEVICE",
    "ROWS",
    "SAMPLES",
    "MSGS~",
    "SEQ",
    "MISSING",
    "DEAD",
    "EXPECTED",
    "STATUS",
)
_LEFT: Final = (0, 4, 8)  # columns of text; the others are numbers, aligned right


def format_table(result: AuditResult) -> str:
    """The human report: one line per device (problems first past 50 devices), gaps, verdict.
    Nothing from the database is printed as it is: see :func:`visible`."""
    verdict = result.verdict or reconcile(result)
    window = (
        f"{result.since.isoformat() if result.since else 'beginning'} .. "
        f"{result.until.isoformat() if result.until else 'now'}"
    )
    lines = [f"audit: readings by device ts in [{window}), dead letters by received_at"]
    devices = result.devices
    shown = devices
    if len(devices) > TABLE_DEVICES:
        shown = [d for d in devices if not d.ok][:TABLE_DEVICES]
    lines += _table(shown, result.samples_per_message)
    if len(devices) > len(shown):
        hidden = len(devices) - len(shown)
        lines.append(f"... {hidden:,} more devices, all ok (--json lists every device)")
    for d in shown:
        lines.extend(f"  {d.device_id}: {p}" for p in d.problems)
        lines.extend(f"  {d.device_id}: note: {n}" for n in d.notes)
    if result.unmatched_dead_letters:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(result.unmatched_dead_letters.items()))
        lines.append(f"dead letters on topics not matching {result.template}: {reasons}")
    lines.append(f"duplicates absorbed: n/a ({DUPLICATES_NOTE})")
    lines.extend(f"{p}" for p in verdict.problems if p.startswith("total:"))
    lines.extend(f"note: {n}" for n in verdict.notes)
    lines.append(verdict.line)
    return "\n".join(visible(line) for line in lines)


def _table(devices: Sequence[DeviceAudit], spm: int) -> list[str]:
    """The header and one aligned line per device (cells made visible before they are
    measured, so that an escaped device id keeps its column straight)."""
    table = [_HEADER, *(_row(d, spm) for d in devices)]
    widths = [max(len(row[i]) for row in table) for i in range(len(_HEADER))]
    return [
        "  ".join(
            c.ljust(w) if i in _LEFT else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in table
    ]


def _row(d: DeviceAudit, spm: int) -> tuple[str, ...]:
    seq, exp = d.seq, d.expected
    return (
        visible(d.device_id),
        f"{d.rows:,}",
        f"{d.samples:,}",
        f"{d.messages_estimated(spm):,}",
        f"{seq.first}..{seq.last}" if seq else "-",
        "-" if d.unexplained_missing is None else f"{d.unexplained_missing:,}",
        f"{d.dead_letters:,}",
        f"{exp.samples:,}" if exp and exp.samples is not None else "-",
        "ok" if d.ok else "PROBLEM",
    )
