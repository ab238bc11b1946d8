"""Throwaway and embedded PostgreSQL and MQTT brokers: one implementation for ``ingest demo``,
the tests and the benchmarks.

Every server lives in one directory of its own, listens on a free 127.0.0.1 port that it keeps
across restarts and writes nothing outside that directory; ``close()`` stops it, and whatever
is still running when the interpreter exits is stopped by an atexit hook.

Modules:

* ``ports``: ``free_port``, ``port_open``.
* ``postgres``: :class:`PostgresServer`, a cluster made with ``initdb`` and run with ``pg_ctl``
  from a directory of binaries (by default the ``pgserver`` wheel's).
* ``brokers``: :class:`MosquittoBroker` (a ``mosquitto`` binary with the project's
  config/mosquitto.conf) and :class:`IotcoreBroker` (rumqttd from the ``iotcore`` wheel).
* ``throwaway``: servers in a process-wide temporary directory that is deleted at exit, for the
  tests and the benchmarks: local binaries (``Mosquitto``, ``PostgresCluster``) or the wheels
  (``EmbeddedBroker``, ``EmbeddedPostgres``).
* ``docker``: the same servers in containers (testcontainers), when a Docker daemon answers.
"""

from ingest.devservers._process import EmbeddedServerError
from ingest.devservers.brokers import (
    Broker,
    IotcoreBroker,
    Listener,
    MosquittoBroker,
    find_mosquitto,
    iotcore_available,
    mosquitto_config,
    start_broker,
)
from ingest.devservers.ports import free_port, port_open
from ingest.devservers.postgres import PostgresServer, find_postgres_bindir, pgserver_bindir

__all__ = [
    "Broker",
    "EmbeddedServerError",
    "IotcoreBroker",
    "Listener",
    "MosquittoBroker",
    "PostgresServer",
    "find_mosquitto",
    "find_postgres_bindir",
    "free_port",
    "iotcore_available",
    "mosquitto_config",
    "pgserver_bindir",
    "port_open",
    "start_broker",
]
