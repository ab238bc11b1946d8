"""``--format senml``: a message's samples as one RFC 8428 SenML pack, in JSON or CBOR.

The pack names the device in its base name (``bn`` ``"<device_id>:"``), so a route with or
without ``{device_id}`` in its template reads the same device id; the first sample's time is
the base time (``bt``, seconds since the epoch) and the records of the later samples carry
their offset from it (``t``). Every field of a sample but ``ts`` is a record: numbers ``v``
(``seq`` included, which the audit reconciles), text ``vs`` (the firmware version, ``fw``),
with a unit (``u``) where SenML registers one.

Written from RFC 8428 for the simulator alone: it shares no code with the daemon's decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import cbor2
import orjson

__all__ = ["CBOR_LABELS", "UNITS", "encoder", "senml_pack"]

#: RFC 8428 section 12.1 units of the simulated metrics (``rssi`` is dBm, which it has not).
UNITS: Final[Mapping[str, str]] = {"temperature": "Cel", "humidity": "%RH", "battery": "V"}
#: RFC 8428 section 6, Table 4: the labels a CBOR pack uses instead of the JSON names.
CBOR_LABELS: Final[Mapping[str, int]] = {
    "bn": -2,
    "bt": -3,
    "n": 0,
    "u": 1,
    "v": 2,
    "vs": 3,
    "t": 6,
}

#: A device's samples (each ``{"ts": <epoch ms>, <metric>: <value>, ...}``) -> payload.
Encoder = Callable[[str, Sequence[Mapping[str, Any]]], bytes]


def senml_pack(device_id: str, samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The records of one pack (JSON names) for ``samples`` of ``device_id``."""
    first_ms = samples[0]["ts"]
    records: list[dict[str, Any]] = []
    for sample in samples:
        offset = (sample["ts"] - first_ms) / 1000
        for name, value in sample.items():
            if name == "ts":
                continue
            record: dict[str, Any] = {"n": name, "vs" if type(value) is str else "v": value}
            unit = UNITS.get(name)
            if unit is not None:
                record["u"] = unit
            if offset:
                record["t"] = offset
            records.append(record)
    records[0] = {"bn": f"{device_id}:", "bt": first_ms / 1000, **records[0]}
    return records


def _json(device_id: str, samples: Sequence[Mapping[str, Any]]) -> bytes:
    return orjson.dumps(senml_pack(device_id, samples))


def _cbor(device_id: str, samples: Sequence[Mapping[str, Any]]) -> bytes:
    records = senml_pack(device_id, samples)
    return cbor2.dumps([{CBOR_LABELS[k]: v for k, v in record.items()} for record in records])


def encoder(fmt: str, cbor: bool) -> Encoder | None:
    """How a device of the fleet turns samples into a payload; None for the formats that
    send the samples as JSON objects (``json``, and ``value`` which splits them)."""
    if fmt != "senml":
        return None
    return _cbor if cbor else _json
