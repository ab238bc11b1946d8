"""The start-up check of the aiomqtt/paho internals the adapter uses (ingest.mqtt.guard)."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import aiomqtt
import pytest

from ingest.errors import FatalError
from ingest.mqtt.guard import AIOMQTT_CLIENT, PAHO_CLIENT, TESTED_VERSIONS, check_internals
from ingest.mqtt.session import MqttSession
from ingest.settings import MqttEndpoint

ROOT = Path(__file__).resolve().parents[3]


async def _client() -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", 1883)  # no socket until it is entered


def test_the_installed_libraries_have_everything() -> None:
    check_internals(asyncio.run(_client()))


@pytest.mark.parametrize("name", PAHO_CLIENT)
def test_a_paho_client_lacking_an_attribute_is_fatal(name: str) -> None:
    client = asyncio.run(_client())
    inner = client._client
    fields = {n: getattr(inner, n) for n in PAHO_CLIENT if n != name}
    fields["on_socket_open"] = inner.on_socket_open
    client._client = SimpleNamespace(**fields)  # type: ignore[assignment]
    with pytest.raises(FatalError) as caught:
        check_internals(client)
    message = str(caught.value)
    assert f"paho.mqtt.client.Client has no attribute {name!r}" in message
    assert "aiomqtt==2.5.1" in message and "paho-mqtt==2.2.0" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", AIOMQTT_CLIENT)
def test_an_aiomqtt_client_lacking_an_attribute_is_fatal(name: str) -> None:
    client = asyncio.run(_client())
    stand_in = SimpleNamespace(**{n: getattr(client, n) for n in AIOMQTT_CLIENT if n != name})
    with pytest.raises(FatalError, match=f"aiomqtt.Client has no attribute '{name}'"):
        check_internals(stand_in)


def test_aiomqtt_no_longer_registering_its_reader_is_fatal() -> None:
    client = asyncio.run(_client())
    client._client.on_socket_open = None
    with pytest.raises(FatalError, match="on_socket_open"):
        check_internals(client)


def test_a_new_session_is_checked() -> None:
    async def make() -> None:
        MqttSession(
            MqttEndpoint.parse("mqtt://127.0.0.1:1883"),
            client_id="guard-test",
            protocol="3.1.1",
            keepalive=30,
            receive_maximum=10,
            session_expiry=0,
        )

    asyncio.run(make())  # passes with the pinned versions; the cases above show it can fail


def test_the_reader_replaced_behind_our_back_is_fatal() -> None:
    """If aiomqtt registered its own socket reader after ours, paho would read the socket
    outside our reader: the fast path would be off without a word. It is fatal instead."""

    async def run() -> None:
        session = MqttSession(
            MqttEndpoint.parse("mqtt://127.0.0.1:1883"),
            client_id="guard-test",
            protocol="3.1.1",
            keepalive=30,
            receive_maximum=10,
            session_expiry=0,
        )
        session._reader_installed = True
        with pytest.raises(FatalError, match="outside this adapter's reader"):
            session._buffered_recv(1)

    asyncio.run(run())


def test_pyproject_pins_exactly_the_tested_versions() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in TESTED_VERSIONS.items():
        assert f"{name}=={version}" in deps, f"pyproject.toml must pin {name}=={version}"


def test_constraints_agree_with_the_pins() -> None:
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    )
    normalized = {name.lower().replace("_", "-"): v for name, v in pins.items()}
    for name, version in TESTED_VERSIONS.items():
        assert normalized.get(name) == version
