#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume.
#
# 1. TCP connections must use TLS: the image's catch-all `host all all all scram-sha-256` line
#    becomes `hostssl` (the server certificate comes from the setup service, see
#    docker-compose.yml). Only the container's own loopback connections may skip it.
# 2. The login roles of the stack, each a member of a role `ingest migrate` grants privileges
#    to (docs/design.md, "Roles"): `ingest_daemon` (ingest_writer) for the daemon and
#    `grafana_reader` (ingest_reader) for Grafana. Neither owns anything nor may create
#    anything; the tables belong to $POSTGRES_USER, which only the one-shot `migrate` service
#    uses. The two NOLOGIN roles are created here when absent so that the memberships can be
#    granted before the first migration; `ingest migrate` keeps roles that exist.
set -euo pipefail

sed -i -E 's/^host([[:space:]]+all[[:space:]]+all[[:space:]]+all[[:space:]])/hostssl\1/' \
    "$PGDATA/pg_hba.conf"
grep -Eq '^hostssl[[:space:]]+all[[:space:]]+all[[:space:]]+all[[:space:]]' "$PGDATA/pg_hba.conf"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=writer_password="${INGEST_DB_PASSWORD:?INGEST_DB_PASSWORD must be set}" \
    --set=reader_password="${GRAFANA_DB_PASSWORD:?GRAFANA_DB_PASSWORD must be set}" <<'SQL'
SELECT 'CREATE ROLE ingest_writer NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ingest_writer') \gexec
SELECT 'CREATE ROLE ingest_reader NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ingest_reader') \gexec

CREATE ROLE ingest_daemon LOGIN CONNECTION LIMIT 50 PASSWORD :'writer_password'
    IN ROLE ingest_writer;

CREATE ROLE grafana_reader LOGIN CONNECTION LIMIT 20 PASSWORD :'reader_password'
    IN ROLE ingest_reader;
-- Grafana runs whatever SQL a dashboard editor types: read-only transactions, and a runaway
-- panel query must not hold a connection (or locks) for long.
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
SQL
