"""Throwaway and embedded PostgreSQL and MQTT brokers: one implementation for ``ingest demo``,
the tests and the benchmarks.

Every server lives in one directory of its own, listens on a free 127.0.0.1 port that it keeps
across restarts and writes nothing outside that directory; ``close()`` stops it, and whatever
is still running when the interpreter exits is stopped by an atexit hook.

Modules:

* ``ports``: ``free_port``, ``port_open``.
* ``postgres``: :class:`PostgresServer`, a cluster made with ``initdb`` and run with ``pg_ctl``
  from a directory of binaries (by default the ``pgserver`` wheel's); extra postgresql.conf
  ``settings`` (``ssl = on`` ...) and pg_hba.conf lines (``hba``); ``run_sql``.
* ``brokers``: :class:`MosquittoBroker` (a ``mosquitto`` binary with the project's
  config/mosquitto.conf, ``overrides``, extra :class:`Listener` s such as TLS ones, password
  and ACL files; ``ports`` lists what it bound) and :class:`IotcoreBroker` (rumqttd from the
  ``iotcore`` wheel).
* ``throwaway``: the same servers in a process-wide temporary directory that is deleted at
  exit, for the tests and the benchmarks: local binaries (``Mosquitto``, ``PostgresCluster``)
  or the wheels (``EmbeddedBroker``, ``EmbeddedPostgres``).
* ``docker``: the same servers in containers (testcontainers), when a Docker daemon answers.
* ``tls``: a throwaway CA with server and client certificates; mosquitto password files.
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
from ingest.devservers.postgres import (
    PostgresServer,
    find_postgres_bindir,
    local_postgres_bindir,
    pgserver_bindir,
    run_sql,
)

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
    "local_postgres_bindir",
    "mosquitto_config",
    "pgserver_bindir",
    "port_open",
    "run_sql",
    "start_broker",
]
