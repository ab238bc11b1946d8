-- The dashboard fold reads a row per series and minute of each batch instead of every point
-- (docs/design.md, "Database"). The writer hands a batch's aggregates to the fold in
-- dashboard_staged, in the batch's own transaction: computed by the writer for a batch copied
-- straight into points (every row inserted), by the server from the rows an INSERT ... ON
-- CONFLICT DO NOTHING actually inserted otherwise; so duplicates still count once. Points no
-- longer carry a batch number: the `batch` columns and their BRIN indexes go.

-- Per batch and series: one row per UTC minute of numeric readings (bucket, n, sum, min, max,
-- and the newest reading of that minute: last_ts, last_value), or one row of text readings
-- (bucket NULL: n, and the newest: last_ts, last_text). sum saturates as the rollups' do.
CREATE TABLE dashboard_staged (
    batch      bigint      NOT NULL,
    series_id  integer     NOT NULL,
    bucket     timestamptz,
    n          integer     NOT NULL,
    sum        double precision,
    min        double precision,
    max        double precision,
    last_ts    timestamptz NOT NULL,
    last_value double precision,
    last_text  text
);
-- Rows arrive in about batch order and leave with their batch: a small B-tree finds them.
CREATE INDEX dashboard_staged_batch ON dashboard_staged (batch);

-- Batches still pending or set aside (written by the earlier version, not folded): their aggregates
-- from their points, while no writer can add any.
LOCK TABLE points, text_points IN SHARE MODE;

INSERT INTO dashboard_staged (batch, series_id, bucket, n, sum, min, max, last_ts, last_value)
SELECT DISTINCT ON (p.batch, p.series_id, b.bucket)
       p.batch, p.series_id, b.bucket,
       count(*) OVER w, ingest_saturate(sum(p.value::numeric) OVER w),
       min(p.value) OVER w, max(p.value) OVER w, p.ts, p.value
FROM points p
CROSS JOIN LATERAL (
    SELECT date_bin('1 minute', p.ts, timestamptz '2000-01-01 00:00:00+00') AS bucket
) b
WHERE p.batch IN (SELECT batch FROM dashboard_pending UNION ALL SELECT batch FROM dashboard_failed)
WINDOW w AS (PARTITION BY p.batch, p.series_id, b.bucket)
ORDER BY p.batch, p.series_id, b.bucket, p.ts DESC;

INSERT INTO dashboard_staged (batch, series_id, n, last_ts, last_text)
SELECT DISTINCT ON (t.batch, t.series_id)
       t.batch, t.series_id, count(*) OVER (PARTITION BY t.batch, t.series_id), t.ts, t.value
FROM text_points t
WHERE t.batch IN (SELECT batch FROM dashboard_pending UNION ALL SELECT batch FROM dashboard_failed)
ORDER BY t.batch, t.series_id, t.ts DESC;

-- Dropping a column is instant (the rows keep their bytes until rewritten); its index goes
-- with it.
ALTER TABLE points DROP COLUMN batch;
ALTER TABLE text_points DROP COLUMN batch;
