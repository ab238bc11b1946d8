"""PostgresServer's configuration files, written without starting a server; discovery."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from ingest.devservers import brokers, postgres


def _server(
    tmp_path: Path, *, settings: dict[str, str], hba: Sequence[str] = ()
) -> postgres.PostgresServer:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    server = postgres.PostgresServer(tmp_path / "pg", bindir=bindir, settings=settings, hba=hba)
    server.data.mkdir(parents=True)
    (server.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    return server


def test_settings_and_hba_lines_are_written_at_every_start(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_text("KEY")
    key.chmod(0o644)
    server = _server(
        tmp_path,
        settings={"ssl": "on", "ssl_key_file": str(key), "search_path": "it's"},
        hba=["hostssl all all 127.0.0.1/32 cert"],
    )
    for _ in range(2):  # a restart writes them again, without piling up hba lines
        server._write_config()
    conf = (server.data / "iot_ingest_port.conf").read_text().splitlines()
    copy = server.data / "iot_ingest_ssl_key_file"
    assert conf == [
        "port = 0",
        "ssl = 'on'",
        f"ssl_key_file = '{copy}'",
        "search_path = 'it''s'",
    ]
    # A private copy: PostgreSQL refuses a key file that others can read.
    assert copy.read_text() == "KEY" and copy.stat().st_mode & 0o777 == 0o600
    assert (server.data / "pg_hba.conf").read_text() == (
        "hostssl all all 127.0.0.1/32 cert\nhost all all 127.0.0.1/32 trust\n"
    )


def test_a_file_setting_that_names_no_file_is_kept_as_given(tmp_path: Path) -> None:
    server = _server(tmp_path, settings={"ssl_crl_file": ""})
    server._write_config()
    assert "ssl_crl_file = ''" in (server.data / "iot_ingest_port.conf").read_text()


def test_local_binaries_can_be_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_TEST_LOCAL_SERVERS", "0")
    assert postgres.local_postgres_bindir() is None
    assert brokers.find_mosquitto() is None
