"""Found against expected: every device's problems and notes, and the verdict. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ingest.tools.audit.results import AuditResult, DeviceAudit, SeqStats
    from ingest.tools.audit.simulator_report import DeviceExpectation, SimReport

__all__ = ["Verdict", "reconcile"]

_COPIES: Final = " (a redelivered message is dead-lettered again: dead letters have no natural key)"


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    line: str
    problems: list[str]
    notes: list[str]


def _ranges_text(ranges: Sequence[tuple[int, int]], total: int) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
    more = total - len(ranges)
    return shown + (f" (+{more} more)" if more > 0 else "")


def _in_dead_letters(explained: int) -> str:
    return f"; not counting {explained} found in dead letters" if explained else ""


def _reconcile_device(d: DeviceAudit, report: SimReport | None, spm: int) -> None:
    d.problems.clear()
    d.notes.clear()
    if d.seq is not None and d.seq.repeats:
        d.notes.append(f"{d.seq.repeats} repeated seq values (seq restarted?)")
    exp = d.expected
    if exp is None or exp.samples is None:
        _reconcile_seq_only(d, report)
    else:
        _reconcile_expected(d, exp, exp.samples, spm)


def _reconcile_seq_only(d: DeviceAudit, report: SimReport | None) -> None:
    """Nothing says how many samples the device sent: only gaps inside its seq range count."""
    seq = d.seq
    d.missing_ranges = list(seq.first_gaps) if seq else []
    if seq is None:
        d.unexplained_missing = None
        return
    explained = sum(1 for s in d.dead_letter_seqs if seq.first <= s <= seq.last)
    d.unexplained_missing = max(0, seq.missing - explained)
    if d.unexplained_missing:
        d.problems.append(
            f"{d.unexplained_missing} seq missing in {seq.gaps} gap(s): "
            + _ranges_text(seq.first_gaps, seq.gaps)
            + _in_dead_letters(explained)
        )
    if report is not None and report.per_device is not None:
        d.notes.append("not in the simulator report")


def _reconcile_expected(d: DeviceAudit, exp: DeviceExpectation, expected: int, spm: int) -> None:
    """The simulator says the device sent ``expected`` samples, seq 1..expected."""
    found = d.samples + d.dead_letter_samples
    if d.seq is not None:
        unexplained, where = _missing_seq(d, d.seq, expected)
    else:
        d.missing_ranges = []
        unexplained = max(0, expected - found)
        where = " (no seq field to say which)"
    d.unexplained_missing = unexplained
    if found > expected:
        d.problems.append(f"{found - expected} samples more than the {expected} generated")
    if unexplained > exp.failed * spm:
        d.problems.append(f"{unexplained} of {expected} samples missing{where}")
    elif unexplained:
        d.notes.append(
            f"{unexplained} samples missing{where}, within the {exp.failed} failed publishes"
        )
    undecodable = d.dead_letters - d.dead_letters_decodable
    if undecodable < exp.bad - exp.failed:
        d.problems.append(f"{undecodable} dead letters for {exp.bad} bad messages sent")
    elif undecodable > exp.bad:
        d.notes.append(f"{undecodable} dead letters for {exp.bad} bad messages sent{_COPIES}")
    if d.dead_letter_samples:
        d.notes.append(f"{d.dead_letter_samples} samples are in dead letters that decode now")


def _missing_seq(d: DeviceAudit, seq: SeqStats, expected: int) -> tuple[int, str]:
    """Seq numbers of 1..expected neither stored nor in a dead letter, and which they are;
    sets the device's missing ranges (before the first, the gaps, after the last)."""
    head = max(0, seq.first - 1)
    tail = max(0, expected - seq.last)
    ranges = ([(1, seq.first - 1)] if head else []) + list(seq.first_gaps)
    ranges += [(seq.last + 1, expected)] if tail else []
    d.missing_ranges = ranges
    missing = head + seq.missing + tail
    if seq.first < 1 or seq.last > expected:
        d.problems.append(f"seq {seq.first}..{seq.last} outside the 1..{expected} published")
    explained = sum(1 for s in d.dead_letter_seqs if 1 <= s <= expected)
    ranges_total = seq.gaps + (1 if head else 0) + (1 if tail else 0)
    where = ": seq " + _ranges_text(ranges, ranges_total) if ranges else ""
    return max(0, missing - explained), where + _in_dead_letters(explained)


@dataclass(frozen=True, slots=True)
class _Totals:
    """What was found in all, over every device."""

    seen: int  # devices with readings or dead letters
    samples: int
    dead_letter_samples: int
    dead_letters: int
    undecodable: int
    unexplained_missing: int

    @classmethod
    def of(cls, result: AuditResult) -> _Totals:
        devices = result.devices
        dead = sum(d.dead_letters for d in devices) + sum(result.unmatched_dead_letters.values())
        return cls(
            seen=len([d for d in devices if d.rows or d.dead_letters]),
            samples=sum(d.samples for d in devices),
            dead_letter_samples=sum(d.dead_letter_samples for d in devices),
            dead_letters=dead,
            undecodable=dead - sum(d.dead_letters_decodable for d in devices),
            unexplained_missing=sum(d.unexplained_missing or 0 for d in devices),
        )


def reconcile(result: AuditResult) -> Verdict:
    """Fill in every device's problems and notes; the overall verdict. Pure: no I/O."""
    report = result.report
    for d in result.devices:
        _reconcile_device(d, report, result.samples_per_message)
    problems = [f"{d.device_id}: {p}" for d in result.devices for p in d.problems]
    notes: list[str] = []
    totals = _Totals.of(result)
    unmatched = sum(result.unmatched_dead_letters.values())
    if unmatched:
        notes.append(f"{unmatched} dead letters have a topic that does not match the template")
    if report is not None and result.devices_filtered:
        notes.append("--device given: totals not compared with the report")
    elif report is not None:
        _compare_totals(totals, report, result.samples_per_message, problems, notes)
    line = _verdict_line(totals, report, problems)
    verdict = Verdict(ok=not problems, line=line, problems=problems, notes=notes)
    result.verdict = verdict
    return verdict


def _compare_totals(
    totals: _Totals, report: SimReport, spm: int, problems: list[str], notes: list[str]
) -> None:
    """The totals against the simulator report, allowing the failed publishes as slack."""
    slack = report.failed * spm
    found = totals.samples + totals.dead_letter_samples
    if report.samples is not None:
        low, high = report.samples, report.samples + slack
    else:
        low = max(0, report.published - report.duplicates - report.bad - report.failed) * spm
        high = low + slack
        notes.append("report without 'samples': expected samples derived from 'published'")
    if found < low:
        problems.append(f"total: {found} samples found, {low} published")
    elif found > high:
        problems.append(f"total: {found} samples found, more than the {high} sent")
    if report.per_device is None and totals.unexplained_missing > slack:
        problems.append(
            f"total: {totals.unexplained_missing} seq missing inside the devices' ranges"
        )
    undecodable = totals.undecodable
    if undecodable < report.bad - report.failed:
        problems.append(f"total: {undecodable} dead letters for {report.bad} bad messages")
    elif undecodable > report.bad:
        notes.append(f"{undecodable} dead letters for {report.bad} bad messages{_COPIES}")
    if totals.seen < report.devices:
        problems.append(f"total: data from {totals.seen} devices of {report.devices}")
    elif totals.seen > report.devices:
        notes.append(f"data from {totals.seen} devices, the report has {report.devices}")
    if report.failed:
        notes.append(f"{report.failed} publishes failed: they may or may not have arrived")


def _verdict_line(totals: _Totals, report: SimReport | None, problems: list[str]) -> str:
    ok = not problems
    summary = (
        f"{totals.seen} devices, {totals.samples:,} samples"
        + (
            f" (+{totals.dead_letter_samples:,} in dead letters)"
            if totals.dead_letter_samples
            else ""
        )
        + f", {totals.dead_letters:,} dead letters"
    )
    if report is None:
        head = "NO GAPS" if ok else "GAPS"
        return (
            f"verdict: {head}: {summary}, {totals.unexplained_missing:,} seq missing "
            "(no report to compare counts)"
        )
    expected = f"{report.samples:,} samples published" if report.samples is not None else "report"
    head = "RECONCILED" if ok else "NOT RECONCILED"
    line = f"verdict: {head}: {summary}; expected {expected}, {report.bad:,} bad sent"
    return line + (f"; {len(problems)} problem(s)" if not ok else "")
