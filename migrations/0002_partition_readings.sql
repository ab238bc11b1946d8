-- readings becomes a partitioned table: RANGE on ts, one partition per UTC day, created ahead
-- of time by the daemon (ingest/partitions.py), plus a default partition that catches whatever
-- falls outside them (late samples older than the first partition, clocks far in the future).
-- Retention then drops whole partitions instead of deleting rows.
--
-- An existing installation keeps its data without a rewrite: the old table is renamed and
-- attached as one partition `readings_legacy` covering everything before tomorrow (one
-- validation scan, no copy, its primary key index is reused). Rows dated tomorrow or later move
-- to the new table. Retention drops `readings_legacy` as a whole once all of it is older than
-- the cutoff. The whole file is one transaction: either all of this happens or none.
DO $migration$
DECLARE
    -- Midnight UTC after today, whatever the session time zone.
    bound timestamptz := (date_trunc('day', now() AT TIME ZONE 'UTC') + interval '1 day')
                         AT TIME ZONE 'UTC';
    pkey  text;
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'readings'::regclass) = 'p' THEN
        RETURN;  -- partitioned already (by hand): nothing to convert
    END IF;

    -- No writer may add rows between the existence check and the attach.
    LOCK TABLE readings IN ACCESS EXCLUSIVE MODE;
    ALTER TABLE readings RENAME TO readings_legacy;
    SELECT conname INTO pkey FROM pg_constraint
    WHERE conrelid = 'readings_legacy'::regclass AND contype = 'p';
    IF pkey IS NOT NULL THEN
        -- Frees the name readings_pkey for the new table (renames the index too).
        EXECUTE format('ALTER TABLE readings_legacy RENAME CONSTRAINT %I TO readings_legacy_pkey',
                       pkey);
    END IF;

    CREATE TABLE readings (
        device_id text             NOT NULL,
        metric    text             NOT NULL,
        ts        timestamptz      NOT NULL,
        value     double precision NOT NULL,
        PRIMARY KEY (device_id, metric, ts)
    ) PARTITION BY RANGE (ts);
    CREATE TABLE readings_default PARTITION OF readings DEFAULT;

    IF EXISTS (SELECT FROM readings_legacy) THEN
        WITH moved AS (DELETE FROM readings_legacy WHERE ts >= bound RETURNING *)
        INSERT INTO readings (device_id, metric, ts, value)
        SELECT device_id, metric, ts, value FROM moved;
        EXECUTE format(
            'ALTER TABLE readings ATTACH PARTITION readings_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            bound);
    ELSE
        DROP TABLE readings_legacy;
    END IF;
END
$migration$;
