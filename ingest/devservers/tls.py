"""Throwaway TLS material and broker credentials for tests of encrypted and authenticated
connections, made with the ``openssl`` and ``mosquitto_passwd`` command-line tools.

* :func:`make_tls_files`: a CA, a server certificate for ``127.0.0.1``/``localhost`` and a
  client certificate, all signed by that CA (:class:`TlsFiles`; PEM, keys unencrypted and
  private to their owner). Use them with :class:`~ingest.devservers.brokers.Listener` or the
  PostgreSQL ``settings`` (``ssl_cert_file`` ...).
* :func:`mosquitto_password_file`: a mosquitto password file for the given users.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ingest.devservers._process import EmbeddedServerError, _tail

__all__ = ["TlsFiles", "make_tls_files", "mosquitto_password_file"]

_DAYS = "2"  # throwaway: long enough for any test run, short enough to be obviously so
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """Paths of the PEM files :func:`make_tls_files` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _run(*args: str) -> None:
    r = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False, timeout=60
    )
    if r.returncode != 0:
        raise EmbeddedServerError(f"{args[0]} failed:\n{_tail(r.stdout + r.stderr)}")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin:/usr/local/bin")
    if found is None:
        raise EmbeddedServerError(f"no {name} binary on PATH")
    return found


def _signed(openssl: str, d: Path, name: str, cn: str, ext: str, ca: Path, ca_key: Path) -> None:
    key, csr, cert, extfile = (d / f"{name}.{x}" for x in ("key", "csr", "crt", "ext"))
    _run(openssl, "req", *_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    extfile.write_text(ext + "\n")
    _run(
        openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", _DAYS, "-extfile", str(extfile),
    )  # fmt: skip
    key.chmod(0o600)


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh CA with one server and one client certificate, written under ``directory``."""
    openssl = _tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _run(
        openssl, "req", "-x509", *_KEY, "-keyout", str(ca_key), "-out", str(ca),
        "-days", _DAYS, "-subj", "/CN=iot-ingest throwaway CA",
    )  # fmt: skip
    ca_key.chmod(0o600)
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"
    _signed(openssl, directory, "server", "localhost", server_ext, ca, ca_key)
    _signed(openssl, directory, "client", "ingest", "extendedKeyUsage=clientAuth", ca, ca_key)
    return TlsFiles(
        ca=ca,
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


def mosquitto_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """Write a mosquitto password file holding ``users`` (name -> password); returns ``path``."""
    tool = _tool("mosquitto_passwd")
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        _run(tool, "-b", str(path), user, password)
    return path
