"""The supervisor serves its workers' metrics without the daemon's network clients."""

from __future__ import annotations

import subprocess
import sys

import pytest

CLIENTS = ("aiomqtt", "paho", "asyncpg")


def clients_loaded_by(module: str) -> set[str]:
    """Which of CLIENTS a fresh interpreter has loaded after importing ``module``."""
    probe = (
        f"import sys, {module}\n"
        f"print(','.join({{m.split('.')[0] for m in sys.modules}} & set({CLIENTS!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return {name for name in done.stdout.strip().split(",") if name}


@pytest.mark.parametrize(
    "module",
    ["ingest.runtime.supervisor", "ingest.observability.http", "ingest.observability.merge"],
)
def test_importing_does_not_load_the_mqtt_or_database_clients(module: str) -> None:
    assert clients_loaded_by(module) == set()


def test_the_probe_sees_a_client_when_one_is_loaded() -> None:
    # Without this, a probe that can never report anything would pass the test above.
    assert "asyncpg" in clients_loaded_by("ingest.observability.service")
