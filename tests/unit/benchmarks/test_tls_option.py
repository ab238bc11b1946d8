"""The benchmarks' --tls option: URL handling of the benchmark clients, and how drain names,
pairs and reports its measurements over the two transports. No servers: the drains themselves
are run by hand (benchmarks/README.md)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from benchmarks import drain
from benchmarks._backlog import broker_address
from benchmarks._tls import client_endpoint, tls_context
from ingest.devservers.tls import make_tls_files
from ingest.urls import parse_mqtt_url


def test_mqtts_context_verifies_certificate_and_host_name(tmp_path: Path) -> None:
    ca = make_tls_files(tmp_path).ca
    endpoint, context = client_endpoint("mqtts://127.0.0.1:8884", str(ca))
    assert (endpoint.host, endpoint.port, endpoint.tls) == ("127.0.0.1", 8884, True)
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1  # our CA, not the system's


def test_plain_url_has_no_context_and_refuses_a_ca_file() -> None:
    endpoint, context = client_endpoint("mqtt://user:secret@127.0.0.1", None)
    assert (endpoint.port, context, endpoint.username, endpoint.password) == (
        1883,
        None,
        "user",
        "secret",
    )
    with pytest.raises(ValueError, match="mqtts://"):
        tls_context(parse_mqtt_url("mqtt://127.0.0.1"), "ca.crt")


def test_the_backlog_side_stays_on_the_plain_listener() -> None:
    assert broker_address("mqtt://127.0.0.1:1884").port == 1884
    with pytest.raises(ValueError, match="plain"):
        broker_address("mqtts://127.0.0.1:8883")


def test_tls_is_a_shorthand_for_transport_mqtts() -> None:
    assert drain._parser().parse_args(["--tls"]).transport == "mqtts"
    assert drain._parser().parse_args([]).transport == "mqtt"
    assert drain._keys(["ingest"], "both") == ["ingest", "ingest_tls"]
    assert drain._keys(["bare", "ingest"], "mqtts") == ["bare_tls", "ingest_tls"]


def _result(msgs_per_s: float, steady: float) -> dict[str, Any]:
    return {"ok": True, "msgs_per_s": msgs_per_s, "steady_msgs_per_s": steady}


def test_both_transports_give_the_mqtts_over_mqtt_ratio_per_run() -> None:
    runs: list[dict[str, Any]] = [
        {"repeat": 0, "ingest": _result(40000, 50000), "ingest_tls": _result(39000, 48000)},
        {"repeat": 1, "ingest": _result(38000, 46000), "ingest_tls": _result(30000, 36000)},
    ]
    for run in runs:
        run["ratios"] = drain._ratios(run)
    assert runs[0]["ratios"]["ingest_tls_over_ingest"] == 0.975
    assert runs[1]["ratios"]["ingest_tls_over_ingest_steady"] == 0.783
    assert runs[0]["ratios"]["ingest_over_bare"] is None  # bare skipped
    summary = drain.summarize(runs)
    assert set(summary) == {"ingest", "ingest_tls", "ratios"}
    assert summary["ingest_tls"]["msgs_per_s"]["median"] == 34500
    lines = drain._ratio_lines(summary["ratios"])
    assert lines == [
        "mqtts / mqtt (messages/s, the same as rows/s): ingest = 0.882 (0.789..0.975) "
        "(after first message: 0.871 (0.783..0.960))"
    ]
