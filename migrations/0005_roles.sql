-- Least privilege (docs/design.md, "Roles"): the daemon may run as an ingest_writer login that
-- owns nothing and may not issue DDL. The only DDL it needs at run time, creating and dropping
-- time partitions, goes through the two functions below: SECURITY DEFINER, so they run as
-- their owner (the role that migrated, owner of the tables), with a fixed search_path (every
-- relation is named with its schema) so that nothing a caller creates can stand in for what
-- they use. They act only on the partitioned tables readings and readings_1m owned by that same
-- role, with names and ranges they compute themselves. EXECUTE is revoked from PUBLIC here and
-- granted to ingest_writer by `ingest migrate` (ingest/db/roles.py), which also makes the roles
-- and grants the table privileges.

-- Create the partition of `parent` (readings: one per UTC day on ts, readings_1m: one per UTC
-- month on bucket, named as ingest/db/partitions.py expects) that starts at `lo`, and return
-- its name; NULL when a table of that name exists. As partitions.py did before: created
-- outside the table, the rows that the default partition holds for its range moved in, then
-- attached (ATTACH does not block the writers; CREATE ... PARTITION OF would lock the parent
-- exclusively). The caller holds the maintenance advisory lock and has checked that no
-- partition overlaps the range.
CREATE FUNCTION ingest_create_partition(parent regclass, lo timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    sch   name;
    rel   name;
    dflt  regclass;
    unit  text;
    col   text;
    start timestamp := lo AT TIME ZONE 'UTC';
    hi    timestamptz;
    part  text;
BEGIN
    SELECT n.nspname, c.relname INTO sch, rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = parent AND c.relkind = 'p' AND c.relname IN ('readings', 'readings_1m')
      AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user);
    IF rel IS NULL THEN
        RAISE EXCEPTION 'ingest partitions: % is not readings or readings_1m', parent
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    unit := CASE rel WHEN 'readings' THEN 'day' ELSE 'month' END;
    col := CASE rel WHEN 'readings' THEN 'ts' ELSE 'bucket' END;
    IF start <> date_trunc(unit, start) THEN
        RAISE EXCEPTION 'ingest partitions: % does not start a UTC %', lo, unit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    hi := (start + ('1 ' || unit)::interval) AT TIME ZONE 'UTC';
    part := rel || '_p' || to_char(start, CASE unit WHEN 'day' THEN 'YYYYMMDD' ELSE 'YYYYMM' END);
    IF to_regclass(format('%I.%I', sch, part)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Indexes are left out: ATTACH builds the parent's on the partition (after the move).
    -- Rollup rows are updated by every batch of their minute: room for HOT updates.
    EXECUTE format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)%s',
                   sch, part, sch, rel,
                   CASE rel WHEN 'readings_1m' THEN ' WITH (fillfactor = 70)' ELSE '' END);
    SELECT i.inhrelid::regclass INTO dflt FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = parent AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    IF dflt IS NOT NULL THEN
        -- Writers that would route rows of this range to the default partition wait until
        -- commit, so none is left behind there (ATTACH would then fail).
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', dflt);
        EXECUTE format('WITH moved AS (DELETE FROM %s WHERE %I >= $1 AND %I < $2 RETURNING *)'
                       ' INSERT INTO %I.%I SELECT * FROM moved', dflt, col, col, sch, part)
            USING lo, hi;
    END IF;
    -- Bounds as UTC literals, whatever the session's TimeZone and DateStyle.
    EXECUTE format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                   sch, rel, sch, part,
                   to_char(start, 'YYYY-MM-DD"T"HH24:MI:SS"+00"'),
                   to_char(hi AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00"'));
    RETURN part;
END
$$;

-- Retention: drop the partitions of `parent` (readings or readings_1m, as above) whose whole
-- range ends at or before `cutoff`, oldest first, returning their names, and delete the older
-- rows its default partition holds. A drop locks the parent exclusively for a moment.
CREATE FUNCTION ingest_drop_expired(parent regclass, cutoff timestamptz) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel  name;
    dflt regclass;
    p    record;
BEGIN
    SELECT c.relname INTO rel FROM pg_class c
    WHERE c.oid = parent AND c.relkind = 'p' AND c.relname IN ('readings', 'readings_1m')
      AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user);
    IF rel IS NULL THEN
        RAISE EXCEPTION 'ingest partitions: % is not readings or readings_1m', parent
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Upper bounds as the server reads its own bound expressions back (NULL: MAXVALUE).
    FOR p IN
        SELECT c.oid::regclass AS part, c.relname::text AS name,
               CASE WHEN b[2] = 'MAXVALUE' THEN NULL ELSE btrim(b[2], '''')::timestamptz END AS hi
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                        '^FOR VALUES FROM \((.+)\) TO \((.+)\)$') AS b
        WHERE i.inhparent = parent AND b IS NOT NULL
        ORDER BY 3
    LOOP
        CONTINUE WHEN p.hi IS NULL OR p.hi > cutoff;
        EXECUTE format('DROP TABLE %s', p.part);
        RETURN NEXT p.name;
    END LOOP;
    SELECT i.inhrelid::regclass INTO dflt FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = parent AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    IF dflt IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s WHERE %I < $1', dflt,
                       CASE rel WHEN 'readings' THEN 'ts' ELSE 'bucket' END)
            USING cutoff;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION ingest_create_partition(regclass, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION ingest_drop_expired(regclass, timestamptz) FROM PUBLIC;

-- Dead letters for dashboards and readers: everything but the payload (raw device bytes, which
-- may hold what a device should never have sent), with the size of the whole message.
CREATE VIEW dead_letters_summary AS
SELECT id, received_at, topic, reason, error,
       coalesce(payload_size, octet_length(payload)) AS payload_size
FROM dead_letters;
