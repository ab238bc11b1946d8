"""PostgreSQL over TLS, configured in the DSN as libpq does it (docs/design.md, Configuration):
a throwaway server with ``ssl = on`` that refuses plaintext, certificates made by ``openssl``
for this test (ingest/devservers/tls.py).

- ``sslmode=verify-full`` with the CA that signed the server: migrations and writes go through,
  every connection of the writer encrypted.
- A root certificate that did not sign the server, or a server certificate for another host
  name: the writer stops at start (FatalError naming the certificate check), never an endless
  retry; the daemon says so in one line and exits 1.
- A root certificate file that cannot be read: a configuration error (the daemon exits 2).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest

from ingest.db.migrate import migrate_dsn
from ingest.devservers.throwaway import PostgresCluster, PostgresFactory
from ingest.devservers.tls import TlsFiles, make_tls_files
from ingest.errors import ConfigError, FatalError, describe_root
from ingest.flow.writer import Writer
from tests.integration.flow.test_writer import fleet
from tests.integration.support import Daemon

pytestmark = pytest.mark.anyio

APP = "ingest-test-tls"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Another CA: it signed nothing the server has."""
    return make_tls_files(tmp_path_factory.mktemp("stranger"))


@pytest.fixture(scope="module")
def otherhost(pki: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A server certificate and key signed by ``pki``'s CA for the name "otherhost" only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary")
    d = tmp_path_factory.mktemp("otherhost")
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "ext"
    ext.write_text("subjectAltName=DNS:otherhost\nextendedKeyUsage=serverAuth\n")
    for args in (
        ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", csr, "-subj", "/CN=otherhost"],
        ["x509", "-req", "-in", csr, "-CA", pki.ca, "-CAkey", pki.ca.parent / "ca.key",
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)
    return cert, key


def tls_only_server(factory: PostgresFactory, cert: Path, key: Path) -> PostgresCluster:
    return factory(
        settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)},
        hba=["hostnossl all all all reject"],  # plaintext refused: TLS or nothing
    )


def tls_dsn(server: PostgresCluster, mode: str, root: Path) -> str:
    return f"{server.dsn()}?sslmode={mode}&sslrootcert={root}"


def tls_writer(dsn: str) -> Writer:
    return Writer(
        dsn=dsn, connect_timeout=5.0, backoff_initial=0.02, backoff_max=0.1, application_name=APP
    )


async def test_verify_full_with_the_right_root_certificate_writes(
    postgres_factory: PostgresFactory, pki: TlsFiles
) -> None:
    server = tls_only_server(postgres_factory, pki.server_cert, pki.server_key)
    dsn = tls_dsn(server, "verify-full", pki.ca)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(f"{server.dsn()}?sslmode=disable")  # plaintext is refused
    await migrate_dsn(dsn)
    async with tls_writer(dsn) as writer:
        result = await writer.write(fleet(10))
        conn = await asyncpg.connect(dsn)
        try:
            encrypted = await conn.fetch(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                " WHERE a.application_name = $1",
                APP,
            )
            count = await conn.fetchval("SELECT count(*) FROM readings")
        finally:
            await conn.close()
    assert result.inserted == 10 * 2 and count == 10 * 2
    assert encrypted and all(r["ssl"] for r in encrypted)


async def test_a_root_certificate_that_did_not_sign_the_server_stops_the_writer(
    postgres_factory: PostgresFactory, pki: TlsFiles, stranger: TlsFiles
) -> None:
    server = tls_only_server(postgres_factory, pki.server_cert, pki.server_key)
    writer = tls_writer(tls_dsn(server, "verify-full", stranger.ca))
    with pytest.raises(FatalError, match="certificate verify failed") as caught:
        async with asyncio.timeout(60), writer:  # a retry loop would never end
            pass
    assert "SSLCertVerificationError" in describe_root(caught.value)
    assert writer.statistics().retries_by_class == {}, "refused at once, not retried"


async def test_verify_full_checks_the_host_name(
    postgres_factory: PostgresFactory, pki: TlsFiles, otherhost: tuple[Path, Path]
) -> None:
    server = tls_only_server(postgres_factory, *otherhost)
    # Signed by the right CA: verify-ca (no host name check) connects...
    conn = await asyncpg.connect(tls_dsn(server, "verify-ca", pki.ca))
    await conn.close()
    # ... verify-full to 127.0.0.1 does not, since the certificate is for "otherhost".
    with pytest.raises(FatalError, match="certificate verify failed") as caught:
        async with asyncio.timeout(60), tls_writer(tls_dsn(server, "verify-full", pki.ca)):
            pass
    assert "mismatch" in describe_root(caught.value)


async def test_an_unreadable_root_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.crt"
    dsn = f"postgresql://ingest:s3cret@127.0.0.1:9/ingest?sslmode=verify-full&sslrootcert={missing}"
    with pytest.raises(ConfigError) as caught:
        async with asyncio.timeout(60), tls_writer(dsn):  # a retry loop would never end
            pass
    assert caught.value.setting == "INGEST_DATABASE_URL"
    assert f"sslrootcert '{missing}' cannot be read" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_the_daemon_names_a_certificate_failure_and_exits(
    postgres_factory: PostgresFactory, pki: TlsFiles, stranger: TlsFiles, tmp_path: Path
) -> None:
    server = tls_only_server(postgres_factory, pki.server_cert, pki.server_key)
    unused_broker = "mqtt://127.0.0.1:9"  # the database comes first: never reached
    topic = f"test/{uuid.uuid4().hex[:8]}/{{device_id}}"
    wrong_ca = tls_dsn(server, "verify-full", stranger.ca)
    with Daemon(database_url=wrong_ca, mqtt_url=unused_broker, topic=topic) as daemon:
        assert daemon.wait(60) == 1, daemon.log_text()
    fatal = [r["msg"] for r in daemon.log_records() if r.get("level") == "error"]
    assert len(fatal) == 1, daemon.log_text()
    assert "certificate verify failed" in fatal[0]

    unreadable = tls_dsn(server, "verify-full", tmp_path / "missing.crt")
    with Daemon(database_url=unreadable, mqtt_url=unused_broker, topic=topic) as daemon:
        assert daemon.wait(60) == 2, daemon.log_text()
    assert "INGEST_DATABASE_URL: sslrootcert" in daemon.log_text()
