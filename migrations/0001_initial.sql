-- Contract tables (docs/design.md, Public contract, "Database"): names and columns are public.
CREATE TABLE IF NOT EXISTS readings (
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    ts        timestamptz      NOT NULL,
    value     double precision NOT NULL,
    PRIMARY KEY (device_id, metric, ts)
);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          bigserial   PRIMARY KEY,
    received_at timestamptz NOT NULL,
    topic       text        NOT NULL,
    payload     bytea       NOT NULL,
    error       text        NOT NULL,
    -- short machine-readable cause (not_json, bad_ts, rejected_by_database, ...)
    reason      text        NOT NULL DEFAULT 'unknown'
);

CREATE INDEX IF NOT EXISTS dead_letters_received_at ON dead_letters (received_at);
