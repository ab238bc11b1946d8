-- The dashboard fold reads a row per series and minute of a batch instead of every point, when
-- that is fewer (docs/design.md, "Database"). A batch copied straight into points (every row
-- inserted) whose readings are at least two per series and minute on average hands the fold
-- its aggregates in dashboard_staged, computed by the writer, in the batch's own transaction;
-- the fold then leaves its points alone. Any other batch (conflict-safe, one reading per
-- series, values summed in numeric) is folded from its points as before, by points.batch.

-- Per batch and series: one row per UTC minute of numeric readings (bucket, n, sum, min, max,
-- and the newest reading of that minute: last_ts, last_value), or one row of text readings
-- (bucket NULL: n, and the newest: last_ts, last_text).
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
-- Rows arrive in about batch order and leave with their batch.
CREATE INDEX dashboard_staged_batch ON dashboard_staged (batch);
