"""The settings are described once, on their fields: the README table and ingest.example.toml
are generated from that metadata, and these tests fail when either has drifted.

Regenerate with ``python -m ingest.settings --markdown`` (between the README's markers) and
``python -m ingest.settings --toml > ingest.example.toml``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest

from ingest.settings import (
    MARKDOWN_BEGIN,
    MARKDOWN_END,
    Settings,
    example_toml,
    load_settings,
    settings_markdown,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE = ROOT / "ingest.example.toml"
_SETTING_LINE = re.compile(r"^# (\w+) = (.+)$")


def test_every_setting_is_described() -> None:
    for f in fields(Settings):
        assert f.metadata["env"] == "INGEST_" + f.name.upper(), f.name
        assert f.metadata["help"] and f.metadata["group"], f.name
        assert "|" not in f.metadata["help"], f"{f.name}: breaks the Markdown table"
        if f.default is None:
            assert f.metadata["example"] is not None, f"{f.name}: the example file needs a value"
        if f.default_factory is not MISSING:
            assert f.metadata["shown"], f"{f.name}: a computed default needs its reading"


def test_readme_table_is_generated_from_the_settings() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKDOWN_BEGIN) == 1 and text.count(MARKDOWN_END) == 1
    start = text.index(MARKDOWN_BEGIN)
    found = text[start : text.index(MARKDOWN_END) + len(MARKDOWN_END)] + "\n"
    assert found == settings_markdown(), (
        "README configuration table is stale: run python -m ingest.settings --markdown"
    )
    for f in fields(Settings):
        assert f"| `{f.metadata['env']}` |" in found


def test_example_file_is_generated_from_the_settings() -> None:
    assert EXAMPLE.read_text(encoding="utf-8") == example_toml(), (
        "ingest.example.toml is stale: run python -m ingest.settings --toml > ingest.example.toml"
    )


def _example_values() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if match := _SETTING_LINE.match(line):
            values[match[1]] = tomllib.loads(f"v = {match[2]}")["v"]
    return values


def test_example_file_lists_every_setting_once() -> None:
    names = [m[1] for line in example_toml().splitlines() if (m := _SETTING_LINE.match(line))]
    assert names == [f.name for f in fields(Settings)]


def test_example_file_as_is_loads_to_the_defaults(tmp_path: Path) -> None:
    assert tomllib.loads(EXAMPLE.read_text(encoding="utf-8")) == {"ingest": {}}
    loaded = load_settings(environ={}, config_file=EXAMPLE)
    assert loaded == Settings(client_id=loaded.client_id)


def test_example_defaults_uncommented_load_to_the_defaults(tmp_path: Path) -> None:
    """Each commented default, uncommented, is what the setting already is."""
    defaults = {
        f.name: f.default
        for f in fields(Settings)
        if f.default is not MISSING and f.default is not None
    }
    values = {k: v for k, v in _example_values().items() if k in defaults}
    cfg = tmp_path / "defaults.toml"
    cfg.write_text(
        "[ingest]\n"
        + "".join(f"{line[2:]}\n" for line in example_toml().splitlines() if _keep(line, values))
    )
    loaded = load_settings(environ={}, config_file=cfg)
    for name, default in defaults.items():
        assert getattr(loaded, name) == default, name


def _keep(line: str, names: dict[str, Any]) -> bool:
    match = _SETTING_LINE.match(line)
    return bool(match and match[1] in names)


@pytest.mark.parametrize("name", [f.name for f in fields(Settings) if f.default is None])
def test_example_values_of_unset_settings_are_accepted(name: str, tmp_path: Path) -> None:
    """An example a reader copies must at least have the right type."""
    extra = {
        "mqtt_ca_file": 'mqtt_url = "mqtts://broker"\n',
        "mqtt_cert_file": 'mqtt_url = "mqtts://broker"\n',
        "mqtt_key_file": 'mqtt_url = "mqtts://broker"\nmqtt_cert_file = "c.pem"\n',
        "mqtt_key_password": 'mqtt_url = "mqtts://broker"\nmqtt_cert_file = "c.pem"\n',
        "mqtt_password": 'mqtt_username = "ingest"\n',
    }.get(name, "")
    (line,) = [x for x in example_toml().splitlines() if x.startswith(f"# {name} = ")]
    cfg = tmp_path / "one.toml"
    cfg.write_text(f"[ingest]\n{extra}{line[2:]}\n")
    assert getattr(load_settings(environ={}, config_file=cfg), name) is not None
