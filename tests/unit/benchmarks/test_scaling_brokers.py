"""``benchmarks.scaling --brokers K``: the backlog's devices sharded as the simulator deals them
(no servers: the benchmark itself is run by hand, benchmarks/README.md)."""

from __future__ import annotations

from benchmarks._backlog import device_id, make_backlog
from benchmarks.scaling import shard


def test_device_d_goes_to_broker_d_mod_k_and_nothing_is_lost() -> None:
    backlog = make_backlog(messages=1000, devices=7, readings=5, samples=None, payload_bytes=150)
    parts = shard(backlog, 3)
    for k, part in enumerate(parts):
        assert set(part.lines) == {
            f"devices/{device_id(d)}/telemetry" for d in range(7) if d % 3 == k
        }
        assert part.rows == part.messages * 5
    assert sum(p.messages for p in parts) == backlog.messages
    assert sum(p.rows for p in parts) == backlog.rows
    assert shard(backlog, 1)[0].lines == backlog.lines
