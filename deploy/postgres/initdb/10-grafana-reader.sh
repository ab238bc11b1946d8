#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume.
#
# Grafana's Postgres data source runs whatever SQL a dashboard editor types, so it connects as a
# read-only role rather than as the owner of the tables. The tables do not exist yet (the daemon
# creates them with `ingest migrate` at its first start, as $POSTGRES_USER): default privileges
# grant SELECT on every table that role creates later, daily partitions included.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=owner="$POSTGRES_USER" \
    --set=reader_password="${GRAFANA_DB_PASSWORD:?GRAFANA_DB_PASSWORD must be set}" <<'SQL'
CREATE ROLE grafana_reader LOGIN CONNECTION LIMIT 20 PASSWORD :'reader_password';
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
-- A runaway panel query must not hold a connection (or locks) for long.
ALTER ROLE grafana_reader SET statement_timeout = '30s';
GRANT USAGE ON SCHEMA public TO grafana_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO grafana_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO grafana_reader;
SQL
