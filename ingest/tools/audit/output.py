"""What a person reads: the table, and one progress line on a terminal while queries run."""

from __future__ import annotations

import time
from typing import Final, TextIO

import anyio

from ingest.tools.audit.reconcile import reconcile
from ingest.tools.audit.results import DUPLICATES_NOTE, AuditResult

__all__ = ["Progress", "format_table"]

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


def format_table(result: AuditResult) -> str:
    """The human report: one line per device (problems first past 50 devices), gaps, verdict."""
    spm = result.samples_per_message
    verdict = result.verdict or reconcile(result)
    window = (
        f"{result.since.isoformat() if result.since else 'beginning'} .. "
        f"{result.until.isoformat() if result.until else 'now'}"
    )
    lines = [f"audit: readings by device ts in [{window}), dead letters by received_at"]
    devices = result.devices
    shown = devices
    hidden = 0
    if len(devices) > TABLE_DEVICES:
        shown = [d for d in devices if not d.ok][:TABLE_DEVICES]
        hidden = len(devices) - len(shown)
    header = ("DEVICE", "ROWS", "SAMPLES", "MSGS~", "SEQ", "MISSING", "DEAD", "EXPECTED", "STATUS")
    table: list[tuple[str, ...]] = [header]
    for d in shown:
        seq = d.seq
        exp = d.expected
        table.append(
            (
                d.device_id,
                f"{d.rows:,}",
                f"{d.samples:,}",
                f"{d.messages_estimated(spm):,}",
                f"{seq.first}..{seq.last}" if seq else "-",
                "-" if d.unexplained_missing is None else f"{d.unexplained_missing:,}",
                f"{d.dead_letters:,}",
                f"{exp.samples:,}" if exp and exp.samples is not None else "-",
                "ok" if d.ok else "PROBLEM",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [
            c.ljust(w) if i in (0, 4, 8) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    if hidden:
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
    return "\n".join(lines)
