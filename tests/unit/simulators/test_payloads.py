"""Payloads and fault generators of the simulator (no sockets)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from simulators._faults import (
    BAD_KINDS,
    EXTREME_VALUES,
    HOSTILE_BAD_KINDS,
    HOSTILE_KINDS,
    MAX_PAYLOAD_BYTES,
    MAX_READINGS,
    REASONS,
    SPARKPLUG_BAD_KINDS,
    UNREADABLE_TS,
    bad_payload,
)
from simulators._payloads import LATE_MAX_MS, LATE_MIN_MS, Device, FaultRatios

START_MS = 1_732_000_000_000
TEMPLATE = "devices/{device_id}/telemetry"


def device(
    index: int = 0,
    *,
    seed: int = 1,
    rate: float = 1.0,
    k: int = 1,
    faults: FaultRatios | None = None,
) -> Device:
    d = Device(
        index,
        seed=seed,
        topic_template=TEMPLATE,
        rate=rate,
        samples_per_message=k,
        faults=faults or FaultRatios(),
    )
    d.start(START_MS)
    return d


def samples_of(payload: bytes) -> list[dict[str, Any]]:
    data = orjson.loads(payload)
    return data if isinstance(data, list) else [data]


def test_a_message_is_one_json_object_with_the_contract_fields() -> None:
    d = device(4)
    assert d.device_id == "dev-00005"
    assert d.topic == "devices/dev-00005/telemetry"
    payload, samples, bad, duplicate, late = d.next_message(START_MS + 0.4)
    assert (samples, bad, duplicate, late) == (1, None, False, 0)
    data = json.loads(payload)
    assert isinstance(data, dict)
    assert list(data) == ["ts", "seq", "temperature", "humidity", "battery", "rssi", "fw"]
    assert data["ts"] == START_MS and data["ts"] > 1e11  # epoch milliseconds
    assert data["seq"] == 1
    numeric = [k for k, v in data.items() if k not in ("ts", "seq") and type(v) in (int, float)]
    assert len(numeric) >= 4
    assert isinstance(data["fw"], str) and data["fw"].count(".") == 2


def test_seq_is_contiguous_and_ts_unique_even_when_the_clock_repeats() -> None:
    d = device()
    stamps = [START_MS, START_MS, START_MS + 1, START_MS + 1, START_MS + 500]
    msgs = [samples_of(d.next_message(w)[0])[0] for w in stamps]
    assert [m["seq"] for m in msgs] == [1, 2, 3, 4, 5]
    assert [m["ts"] for m in msgs] == [
        START_MS,
        START_MS + 1,
        START_MS + 2,
        START_MS + 3,
        START_MS + 500,
    ]


def test_samples_per_message_makes_an_array_of_spaced_samples() -> None:
    d = device(rate=2.0, k=5)  # a message every 500 ms, a sample every 100 ms
    all_samples: list[dict[str, Any]] = []
    for n in range(10):
        payload, samples, *_ = d.next_message(START_MS + n * 500)
        batch = samples_of(payload)
        assert isinstance(orjson.loads(payload), list) and len(batch) == samples == 5
        assert batch[-1]["ts"] == START_MS + n * 500
        assert [b["ts"] - batch[0]["ts"] for b in batch] == [0, 100, 200, 300, 400]
        all_samples += batch
    assert [s["seq"] for s in all_samples] == list(range(1, 51))
    ts = [s["ts"] for s in all_samples]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)


def test_more_samples_than_milliseconds_still_get_unique_timestamps() -> None:
    d = device(rate=100.0, k=50)  # 5,000 samples a second
    ts = [s["ts"] for n in range(20) for s in samples_of(d.next_message(START_MS + n * 10)[0])]
    assert len(set(ts)) == len(ts) == 1000
    assert ts == sorted(ts)


def test_same_seed_same_payloads_other_seed_other_payloads() -> None:
    faults = FaultRatios(bad=0.2, duplicate=0.2, late=0.2)

    def run(seed: int) -> list[tuple[bytes, int, str | None, bool, int]]:
        d = device(3, seed=seed, k=3, faults=faults)
        return [d.next_message(START_MS + n * 1000) for n in range(300)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_late_samples_are_minutes_in_the_past_and_never_collide() -> None:
    d = device(rate=1.0, k=4, faults=FaultRatios(late=1.0))
    ts: list[int] = []
    for n in range(50):
        now = START_MS + n * 1000
        payload, samples, _bad, _dup, late = d.next_message(now)
        assert late == samples == 4
        for s in samples_of(payload):
            assert now - LATE_MAX_MS <= s["ts"] <= now - LATE_MIN_MS or s["ts"] < START_MS - 3000
            ts.append(s["ts"])
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == len(ts)
    assert d.late == 200 and d.seq == 200


def test_late_and_on_time_samples_share_no_timestamp() -> None:
    d = device(rate=1000.0, k=5, faults=FaultRatios(late=0.3))  # dense: one sample per 0.2 ms
    seen: list[dict[str, Any]] = []
    late_total = late_seen = 0
    for n in range(2000):
        payload, _samples, _bad, _dup, late = d.next_message(START_MS + n)
        late_total += late
        batch = samples_of(payload)
        late_seen += sum(1 for s in batch if s["ts"] <= START_MS + n - LATE_MIN_MS)
        seen += batch
    ts = [s["ts"] for s in seen]
    assert len(set(ts)) == len(ts)
    assert late_seen == late_total and 0.25 < late_total / len(ts) < 0.35
    assert [s["seq"] for s in seen] == list(range(1, len(seen) + 1))


def test_bad_messages_come_in_every_kind_and_do_not_use_a_seq() -> None:
    d = device(faults=FaultRatios(bad=0.5))
    kinds: Counter[str] = Counter()
    seqs: list[int] = []
    for n in range(4000):
        payload, samples, bad, duplicate, _late = d.next_message(START_MS + n * 1000)
        if bad is None:
            assert samples == 1
            seqs.append(samples_of(payload)[0]["seq"])
        else:
            assert samples == 0 and not duplicate
            kinds[bad] += 1
    assert seqs == list(range(1, len(seqs) + 1))
    assert set(kinds) == set(BAD_KINDS)
    total = sum(kinds.values())
    assert 0.45 < total / 4000 < 0.55
    assert all(0.15 < n / total < 0.25 for n in kinds.values())
    assert d.bad == total and d.messages == 4000


@pytest.mark.parametrize("ratio", [0.0, 0.1, 1.0])
def test_fault_ratios_are_respected(ratio: float) -> None:
    d = device(faults=FaultRatios(bad=ratio, duplicate=ratio, late=ratio))
    msgs = [d.next_message(START_MS + n * 1000) for n in range(5000)]
    bad = sum(1 for m in msgs if m[2] is not None)
    valid = len(msgs) - bad
    dups = sum(1 for m in msgs if m[3])
    late = sum(m[4] for m in msgs)
    assert bad / len(msgs) == pytest.approx(ratio, abs=0.02)
    if valid:
        assert dups / valid == pytest.approx(ratio, abs=0.02)
        assert late / valid == pytest.approx(ratio, abs=0.02)
    assert d.duplicates == dups and d.late == late


def malformed(kind: str) -> bytes:
    return bad_payload(
        kind,
        device_id="dev-00007",
        ts_ms=START_MS,
        seq=12,
        values=(21.5, 40.2, 97.125, -71),
        fw="1.2.3",
    )


def test_not_json() -> None:
    with pytest.raises(json.JSONDecodeError):
        json.loads(malformed("not_json"))


def test_truncated_json() -> None:
    payload = malformed("truncated_json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(payload)
    assert payload.startswith(b'{"ts":')


def test_invalid_utf8() -> None:
    payload = malformed("invalid_utf8")
    with pytest.raises(UnicodeDecodeError):
        payload.decode("utf-8")
    assert isinstance(json.loads(payload.decode("latin-1")), dict)  # only the encoding is wrong


def test_no_numeric() -> None:
    data = json.loads(malformed("no_numeric"))
    # Nothing the daemon stores: no number, boolean or string (a string is a text reading).
    assert data and not any(type(v) in (int, float, bool, str) for v in data.values())


def test_bad_ts() -> None:
    data = json.loads(malformed("bad_ts"))
    assert data["ts"] == UNREADABLE_TS
    with pytest.raises(ValueError):
        datetime.fromisoformat(data["ts"])
    assert sum(1 for v in data.values() if type(v) in (int, float)) >= 4


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_no_malformed_payload_carries_a_readable_seq(kind: str) -> None:
    try:
        data = json.loads(malformed(kind))
    except (ValueError, UnicodeDecodeError):
        return
    assert "seq" not in data


def test_counters_of_a_device() -> None:
    d = device(faults=FaultRatios(bad=0.3, duplicate=0.3))
    msgs = [d.next_message(START_MS + n * 1000) for n in range(1000)]
    assert d.messages == 1000
    assert d.bad == sum(1 for m in msgs if m[2])
    assert d.duplicates == sum(1 for m in msgs if m[3])
    assert d.seq == 1000 - d.bad


def test_the_fast_path_sends_what_the_general_path_sends() -> None:
    plain = device(9, seed=5)
    # A vanishing late ratio takes the general path without ever drawing a late sample.
    general = device(9, seed=5, faults=FaultRatios(late=1e-300))
    for n in range(200):
        a = plain.next_message(START_MS + n * 1000)
        b = general.next_message(START_MS + n * 1000)
        assert a == b


# --- hostile devices (--hostile-ratio) -------------------------------------------------------


def test_oversized_is_well_formed_and_just_over_the_limit() -> None:
    payload = malformed("oversized")
    assert MAX_PAYLOAD_BYTES < len(payload) <= MAX_PAYLOAD_BYTES + 8192
    data = json.loads(payload)
    # Only its size is wrong: without a limit it would be stored.
    assert data["ts"] == START_MS and isinstance(data["temperature"], float)


def test_too_many_readings_is_one_over_the_limit() -> None:
    data = json.loads(malformed("too_many_readings"))
    readings = [k for k, v in data.items() if k != "ts" and type(v) in (int, float)]
    assert len(readings) == MAX_READINGS + 1
    assert len(malformed("too_many_readings")) < MAX_PAYLOAD_BYTES  # not also too large


def test_far_timestamps() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    ts = json.loads(malformed("ts_year_9999"))["ts"]
    assert (epoch + timedelta(seconds=ts)).year == 9999
    assert ts > 1e11  # the magnitude that a decoder could mistake for 1978 in milliseconds
    ts = json.loads(malformed("ts_before_2000"))["ts"]
    assert epoch + timedelta(milliseconds=ts) < datetime(2000, 1, 1, tzinfo=UTC)
    assert epoch + timedelta(milliseconds=ts) > datetime(1999, 12, 31, tzinfo=UTC)


def test_control_characters_in_names() -> None:
    data = json.loads(malformed("control_chars"))
    names = [k for k in data if k != "ts"]
    assert any("\x1b" in k for k in names) and any("\x07" in k for k in names)
    assert all(type(v) in (int, float) for v in data.values())


@pytest.mark.parametrize("kind", HOSTILE_BAD_KINDS)
def test_no_hostile_payload_carries_a_seq(kind: str) -> None:
    assert "seq" not in json.loads(malformed(kind))


def test_every_bad_kind_has_a_reason() -> None:
    assert set(REASONS) == {*BAD_KINDS, *HOSTILE_BAD_KINDS, *SPARKPLUG_BAD_KINDS}
    assert set(HOSTILE_KINDS) == {*HOSTILE_BAD_KINDS, "extreme"}


def test_hostile_messages_come_in_every_kind() -> None:
    d = device(faults=FaultRatios(hostile=0.6))
    kinds: Counter[str] = Counter()
    seqs: list[int] = []
    extreme = 0
    for n in range(3000):
        payload, samples, bad, duplicate, _late = d.next_message(START_MS + n * 1000)
        if bad is not None:
            assert samples == 0 and not duplicate and bad in HOSTILE_BAD_KINDS
            kinds[bad] += 1
            continue
        sample = samples_of(payload)[0]
        seqs.append(sample["seq"])
        if sample["temperature"] == EXTREME_VALUES[0]:
            extreme += 1
            values = (sample["temperature"], sample["humidity"], sample["battery"], sample["rssi"])
            assert values == EXTREME_VALUES
    assert set(kinds) == set(HOSTILE_BAD_KINDS)
    assert seqs == list(range(1, len(seqs) + 1))  # extreme messages are valid: they use seqs
    assert d.extreme == extreme > 0
    assert d.kinds == dict(kinds) and d.bad == sum(kinds.values())
    share = (sum(kinds.values()) + extreme) / 3000
    assert share == pytest.approx(0.6, abs=0.03)
    assert all(0.12 < n / (sum(kinds.values()) + extreme) < 0.22 for n in kinds.values())


def test_extreme_values_with_sample_arrays() -> None:
    d = device(k=3, faults=FaultRatios(hostile=1.0))
    for n in range(200):
        payload, samples, bad, _dup, _late = d.next_message(START_MS + n * 1000)
        if bad is None:
            assert samples == 3
            for sample in samples_of(payload):
                assert sample["battery"] == 1e308 and sample["rssi"] == -1e308
    assert d.extreme > 0 and d.seq == 3 * d.extreme
