-- The persistent MQTT sessions the daemons opened, one row per client id. A worker's session
-- keeps its share of a shared subscription while the worker is away (for the broker's session
-- expiry, 7 days by default): when a worker set shrinks, the sessions of the workers that are
-- gone hold messages nobody reads until `ingest sessions retire` (or `ingest run --workers N`
-- at start) drains them through the pipeline and ends them at the broker. This table is how
-- those sessions are found.
--
-- The daemon upserts its row at each connect (clearing disconnected_at and retired_at) and
-- refreshes last_seen at most once a minute while connected; after a clean drain it sets
-- disconnected_at. A row whose last_seen is recent and that did not disconnect cleanly may
-- belong to a live worker: retiring it would take its client id over (README, Sessions).
-- broker is the URL without user info (`mqtt://host:port`), never a password.
--
-- As in 0005, the privileges are granted by `ingest migrate` (ingest/db/roles.py):
-- ingest_writer may read, insert and update the rows (the daemon and `ingest sessions`),
-- ingest_reader gets nothing.
CREATE TABLE sessions (
    client_id       text        PRIMARY KEY,
    broker          text        NOT NULL,
    share_group     text,
    first_seen      timestamptz,
    last_seen       timestamptz,
    disconnected_at timestamptz,
    retired_at      timestamptz
);
