"""The brokers' pieces that need no broker: config text, listeners, discovery; the demo's CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ingest.devservers import brokers

ROOT = Path(__file__).resolve().parents[3]


def _settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        words = line.split(maxsplit=1)
        if words and not words[0].startswith("#"):
            out[words[0]] = words[1] if len(words) > 1 else ""
    return out


def test_built_in_broker_settings_match_the_project_config() -> None:
    # A wheel does not carry config/: the built-in copy must say the same.
    project = _settings((ROOT / "config" / "mosquitto.conf").read_text())
    assert _settings(brokers._MOSQUITTO_SETTINGS) == project


def test_overrides_replace_in_place_and_append() -> None:
    text = brokers._override_config("a 1\n# b 2\nc 3\nc 4\n", {"c": "9", "d": "5"})
    assert text == "a 1\n# b 2\nc 9\nd 5\n"


def test_rumqttd_config_listens_on_loopback_only(tmp_path: Path) -> None:
    if not brokers.iotcore_available():
        pytest.skip("iotcore is not installed")
    broker = brokers.IotcoreBroker(tmp_path)
    command = broker._command()
    config = (tmp_path / "rumqttd.toml").read_text()
    assert command[-1] == str(tmp_path / "rumqttd.toml")
    assert 'listen = "127.0.0.1:' in config and "0.0.0.0" not in config


def test_listener_config_lines() -> None:
    listener = brokers.Listener(
        cafile=Path("/c/ca.crt"),
        certfile=Path("/c/s.crt"),
        keyfile=Path("/c/s.key"),
        require_certificate=True,
    )
    assert listener.config(8883) == (
        "listener 8883 127.0.0.1\ncafile /c/ca.crt\ncertfile /c/s.crt\nkeyfile /c/s.key\n"
        "require_certificate true\n"
    )
    assert brokers.Listener().config(1) == "listener 1 127.0.0.1\n"
    assert brokers.Listener(port=1883, host="10.231.1.2").config(1883) == (
        "listener 1883 10.231.1.2\n"
    )


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"certfile": Path("c")}, "certfile and keyfile"),
        ({"require_certificate": True}, "cafile"),
        ({"port": 70000}, "port"),
    ],
)
def test_listener_rejects_what_mosquitto_would(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        brokers.Listener(**kwargs)
