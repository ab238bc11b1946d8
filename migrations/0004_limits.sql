-- Hostile or broken devices (docs/design.md, "Limits"): room for the size of a payload kept
-- only in part, and dashboard tables that no value can wedge.

-- Bytes of the whole payload on the wire when `payload` holds only its first part (a
-- too_large dead letter); NULL: `payload` is the whole message. Instant: nullable, no default.
ALTER TABLE dead_letters ADD COLUMN payload_size bigint;

-- Sums of the rollups saturate instead of overflowing. A double holds any value a device can
-- send, but the sum of two of them may not (1e308 + 1e308): PostgreSQL then raises "value out
-- of range: overflow" and the statement fails, so the fold that maintains the dashboards would
-- fail for the whole fleet on every attempt. The fold (ingest/db/dashboard.py) adds values of
-- magnitude 1e290 or more in numeric (no overflow there) and brings the result back into the
-- range of a double with this function: beyond it, a sum stays at +/-1.7976931348623157e308.
-- `sum` stays a double precision column, read as before.
CREATE FUNCTION ingest_saturate(numeric) RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT least(greatest($1, -1.7976931348623157e308), 1.7976931348623157e308)::float8 $$;

-- Batches that the fold could not apply, set aside so that the others go on (their rows are in
-- readings; only the dashboard tables miss them). The error says why. Once the cause is fixed,
-- moving a row back to dashboard_pending folds the batch:
--   WITH b AS (DELETE FROM dashboard_failed RETURNING batch, stored_at, min_ts, max_ts)
--   INSERT INTO dashboard_pending SELECT * FROM b;
CREATE TABLE dashboard_failed (
    batch     bigint      PRIMARY KEY,
    stored_at timestamptz NOT NULL,
    min_ts    timestamptz NOT NULL,
    max_ts    timestamptz NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    error     text        NOT NULL
);

-- The fleet summary's mean, summed without overflow (same columns and types as before).
CREATE OR REPLACE VIEW fleet_summary_1h AS
SELECT f.metric, coalesce(d.devices, 0) AS devices, f.readings, f.avg, f.min, f.max
FROM (
    SELECT metric, sum(n) AS readings, ingest_saturate(sum(sum::numeric) / sum(n)) AS avg,
           min(min) AS min, max(max) AS max
    FROM readings_fleet_1m
    WHERE bucket >= now() - interval '1 hour'
    GROUP BY metric
) f
LEFT JOIN (
    SELECT metric, count(*) AS devices FROM latest_readings
    WHERE ts >= now() - interval '1 hour'
    GROUP BY metric
) d USING (metric);
