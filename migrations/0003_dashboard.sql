-- Dashboard tables (issue 8; docs/querying.md), maintained exactly once from the rows each
-- batch actually inserted into readings (ingest/dashboard.py), so a redelivered duplicate never
-- counts twice and a rejected batch leaves nothing behind.

-- One row per device. first_seen/last_seen: database time of the first/last batch that stored
-- new readings of the device; last_ts: its newest device timestamp.
CREATE TABLE devices (
    device_id  text        PRIMARY KEY,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    last_ts    timestamptz NOT NULL
) WITH (fillfactor = 50);  -- updated over and over: room for HOT updates

-- The newest reading per device and metric by device timestamp: a late or redelivered sample
-- never replaces a newer one.
CREATE TABLE latest_readings (
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    ts        timestamptz      NOT NULL,
    value     double precision NOT NULL,
    PRIMARY KEY (device_id, metric)
) WITH (fillfactor = 50);

-- One-minute rollups, buckets aligned to UTC minutes. Partitioned by month (ingest/partitions.py
-- creates them ahead and applies INGEST_ROLLUP_RETENTION, which may be longer than the raw
-- data's INGEST_RETENTION); partitions are created WITH (fillfactor = 70) for HOT updates.
CREATE TABLE readings_1m (
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    bucket    timestamptz      NOT NULL,
    n         integer          NOT NULL,
    sum       double precision NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
) PARTITION BY RANGE (bucket);
CREATE TABLE readings_1m_default PARTITION OF readings_1m DEFAULT;
-- Fleet-wide panels read a time range of every device: rows arrive in bucket order, so a BRIN
-- index finds the range for almost nothing on the write path (a B-tree would cost an index
-- insert per new bucket).
CREATE INDEX readings_1m_bucket ON readings_1m USING brin (bucket)
    WITH (pages_per_range = 16, autosummarize = on);

-- The same rollups summed over the whole fleet, per metric: fleet-wide panels (readings per
-- second, a summary of the last hour) read a few rows per minute here instead of one per device
-- and metric in readings_1m. Small (metrics x minutes): not partitioned, pruned by DELETE.
CREATE TABLE readings_fleet_1m (
    metric text             NOT NULL,
    bucket timestamptz      NOT NULL,
    n      bigint           NOT NULL,
    sum    double precision NOT NULL,
    min    double precision NOT NULL,
    max    double precision NOT NULL,
    PRIMARY KEY (bucket, metric)  -- time ranges first: panels read the fleet over a range
) WITH (fillfactor = 50);

-- Deferred maintenance (the writer's default, ingest/dashboard.py): the batch's transaction
-- sets ingest.batch, so the rows it inserts carry that number, and records the batch in
-- dashboard_pending; a fold then applies the batch to the tables above and deletes its pending
-- row in one transaction. Adding a nullable column without a default is instant (existing
-- rows keep NULL: the backfill below covers them); the default then applies to new rows only.
ALTER TABLE readings ADD COLUMN batch bigint;
ALTER TABLE readings ALTER COLUMN batch
    SET DEFAULT nullif(current_setting('ingest.batch', true), '')::bigint;
-- Batch numbers grow with insertion order, so a BRIN index finds a batch's rows by reading
-- a few pages, at almost no cost to the insert.
CREATE INDEX readings_batch ON readings USING brin (batch)
    WITH (pages_per_range = 16, autosummarize = on);
CREATE SEQUENCE dashboard_batch_seq AS bigint;
CREATE TABLE dashboard_pending (
    batch     bigint      PRIMARY KEY,
    stored_at timestamptz NOT NULL DEFAULT now(),
    -- device-time range of the batch's rows: lets a fold prune the daily partitions
    min_ts    timestamptz NOT NULL,
    max_ts    timestamptz NOT NULL
);

-- Existing data (an installation upgraded from an earlier version): compute the dashboard
-- tables once from readings, while no writer can add rows.
LOCK TABLE readings IN SHARE MODE;

CREATE TEMPORARY TABLE backfill_1m ON COMMIT DROP AS
SELECT device_id, metric, date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00') AS bucket,
       count(*)::integer AS n, sum(value) AS sum, min(value) AS min, max(value) AS max
FROM readings
GROUP BY 1, 2, 3;

-- Monthly partitions for the months that hold data (up to next month; anything later stays in
-- the default partition). Same names and bounds as ingest/partitions.py creates.
DO $migration$
DECLARE
    m timestamp;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', bucket AT TIME ZONE 'UTC') FROM backfill_1m
        WHERE bucket < (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '2 months')
                       AT TIME ZONE 'UTC'
        ORDER BY 1
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF readings_1m FOR VALUES FROM (%L) TO (%L)'
            ' WITH (fillfactor = 70)',
            'readings_1m_p' || to_char(m, 'YYYYMM'),
            m AT TIME ZONE 'UTC', (m + interval '1 month') AT TIME ZONE 'UTC');
    END LOOP;
END
$migration$;

INSERT INTO readings_1m (device_id, metric, bucket, n, sum, min, max)
SELECT device_id, metric, bucket, n, sum, min, max FROM backfill_1m;

INSERT INTO readings_fleet_1m (metric, bucket, n, sum, min, max)
SELECT metric, bucket, sum(n), sum(sum), min(min), max(max) FROM backfill_1m GROUP BY 1, 2;

INSERT INTO latest_readings (device_id, metric, ts, value)
SELECT k.device_id, k.metric, r.ts, r.value
FROM (SELECT DISTINCT device_id, metric FROM backfill_1m) k
CROSS JOIN LATERAL (
    SELECT ts, value FROM readings r
    WHERE r.device_id = k.device_id AND r.metric = k.metric
    ORDER BY ts DESC LIMIT 1
) r;

-- Before this migration the database did not record when rows arrived: device time stands in.
INSERT INTO devices (device_id, first_seen, last_seen, last_ts)
SELECT f.device_id, f.first_bucket, l.last_ts, l.last_ts
FROM (SELECT device_id, min(bucket) AS first_bucket FROM backfill_1m GROUP BY device_id) f
JOIN (SELECT device_id, max(ts) AS last_ts FROM latest_readings GROUP BY device_id) l
    USING (device_id);

-- Panels (docs/querying.md) ----------------------------------------------------------------

-- Every device with how long it has been silent.
CREATE VIEW device_status AS
SELECT device_id, first_seen, last_seen, last_ts, now() - last_seen AS silent_for
FROM devices;

-- One row: how many devices there are, and how many were seen recently.
CREATE VIEW fleet_status AS
SELECT count(*) AS devices,
       count(*) FILTER (WHERE last_seen > now() - interval '1 minute')  AS seen_1m,
       count(*) FILTER (WHERE last_seen > now() - interval '5 minutes') AS seen_5m,
       count(*) FILTER (WHERE last_seen > now() - interval '1 hour')    AS seen_1h,
       max(last_seen) AS last_seen
FROM devices;

-- Devices seen within the last `period` (fleet status for any N: devices_seen_within('10 min')).
CREATE FUNCTION devices_seen_within(period interval) RETURNS SETOF devices
LANGUAGE sql STABLE
AS $$ SELECT * FROM devices WHERE last_seen > now() - period $$;

-- Current values of every device (filter on device_id for one device) and their age.
CREATE VIEW current_values AS
SELECT device_id, metric, ts, value, now() - ts AS age
FROM latest_readings;

-- Per metric over the last hour: readings, mean, extremes (fleet rollups) and how many devices
-- sent a value of it within the hour (by device time).
CREATE VIEW fleet_summary_1h AS
SELECT f.metric, coalesce(d.devices, 0) AS devices, f.readings, f.avg, f.min, f.max
FROM (
    SELECT metric, sum(n) AS readings, sum(sum) / sum(n) AS avg, min(min) AS min, max(max) AS max
    FROM readings_fleet_1m
    WHERE bucket >= now() - interval '1 hour'
    GROUP BY metric
) f
LEFT JOIN (
    SELECT metric, count(*) AS devices FROM latest_readings
    WHERE ts >= now() - interval '1 hour'
    GROUP BY metric
) d USING (metric);
