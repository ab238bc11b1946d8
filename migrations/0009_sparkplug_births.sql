-- Sparkplug B births (docs/design.md, "Sparkplug B"): the last NBIRTH or DBIRTH payload of
-- each edge node (device_id <group>/<edge_node>) and device (<group>/<edge_node>/<device>),
-- written in the transaction of the batch that holds it, so that a daemon starting again
-- rebuilds its alias tables before it reads the data the broker kept for it. One row per
-- node or device: a newer birth replaces the row, an older one (a redelivery, or the copy
-- another worker writes) leaves it. born_at is the birth's time (its payload timestamp, else
-- its receive time): the order the tables are rebuilt in.
CREATE TABLE sparkplug_births (
    device_id   text        PRIMARY KEY,
    born_at     timestamptz NOT NULL,
    payload     bytea       NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sparkplug_births_born_at ON sparkplug_births (born_at, device_id);
