"""PostgreSQL and Mosquitto in Docker containers (testcontainers), for a machine that has a
Docker daemon but not the servers' binaries."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from ingest.devservers.brokers import _override_config, mosquitto_config
from ingest.devservers.throwaway import _root_dir

__all__ = ["DockerMosquitto", "DockerPostgres", "docker_available"]


@functools.cache
def docker_available() -> bool:
    """A Docker daemon answers within a few seconds (the CLI alone is not enough)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        r = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class DockerPostgres:
    """postgres:16 through testcontainers; `dsn` is the admin DSN (database `postgres`)."""

    def __init__(self) -> None:
        from testcontainers.community.postgres import PostgresContainer

        self._container = PostgresContainer(
            "postgres:16", username="postgres", password="postgres", dbname="postgres", driver=None
        )
        self.dsn = ""

    def __enter__(self) -> Self:
        self._container.start()
        port = self._container.get_exposed_port(5432)
        self.dsn = f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres"
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._container.stop()


class DockerMosquitto:
    """eclipse-mosquitto:2 through testcontainers, with the project config mounted."""

    def __init__(self) -> None:
        from testcontainers.core.container import DockerContainer

        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-docker-", dir=_root_dir()))
        self.dir.chmod(0o755)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            _override_config(mosquitto_config(), {"persistence_location": "/mosquitto/data/"})
            + "listener 1883 0.0.0.0\n"  # the container's interfaces; we connect via 127.0.0.1
        )
        conf.chmod(0o644)
        self._container = (
            DockerContainer("eclipse-mosquitto:2")
            .with_exposed_ports(1883)
            .with_volume_mapping(str(conf), "/mosquitto/config/mosquitto.conf", "ro")
        )
        self.url = ""

    def __enter__(self) -> Self:
        from testcontainers.core.waiting_utils import wait_for_logs

        self._container.start()
        wait_for_logs(self._container, r"mosquitto version \S+ running", timeout=60)
        self.url = f"mqtt://127.0.0.1:{self._container.get_exposed_port(1883)}"
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._container.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
