-- The records a single node keeps in its state file (fa_restic.jobs.records), one table per
-- kind of collection. The record is kept whole as jsonb, exactly as the job layer writes it;
-- the columns the indexes need are derived from it by PostgreSQL (generated columns), so a
-- write that merges fields into the record (the store's Update) can never leave them stale.

-- Backups and restores: collections "backup" and "restore".
CREATE TABLE jobs (
    kind text NOT NULL CHECK (kind IN ('backup', 'restore')),
    id bigint NOT NULL,
    record jsonb NOT NULL,
    -- The record's "user" ("user" is a reserved word in SQL).
    owner text GENERATED ALWAYS AS (coalesce(record ->> 'user', '')) STORED,
    status text GENERATED ALWAYS AS (coalesce(record ->> 'status', '')) STORED,
    -- Queue order: a user's pending jobs start in ascending sequence.
    sequence bigint GENERATED ALWAYS AS (coalesce((record ->> 'sequence')::bigint, 0)) STORED,
    -- fa_restic.jobs.records.is_live: pending, running, or with an attempt to settle.
    live boolean GENERATED ALWAYS AS (
        coalesce(record ->> 'status', '') IN ('pending', 'running')
        OR coalesce((record ->> 'unsettled')::boolean, false)
    ) STORED,
    -- Which node runs the job, and since when: only the cluster knows these.
    node text,
    claimed_at timestamptz,
    PRIMARY KEY (kind, id)
);

-- Listing pages, newest id first (GET /backup?user=..&status=..): the cost is the page's.
CREATE INDEX jobs_by_owner ON jobs (kind, owner, id DESC);
CREATE INDEX jobs_by_status ON jobs (kind, status, id DESC);
CREATE INDEX jobs_by_owner_status ON jobs (kind, owner, status, id DESC);
-- What a node loads at start: a few live records among a million finished ones.
CREATE INDEX jobs_live ON jobs (kind, id) WHERE live;

-- Snapshots of deleted backups still to be forgotten: collection "forget".
CREATE TABLE forgets (
    snapshot_id text PRIMARY KEY,
    record jsonb NOT NULL
);

-- Small named values (the repository's state, maintenance times): collection "meta".
CREATE TABLE meta (
    key text PRIMARY KEY,
    value jsonb NOT NULL
);

-- Queue order across nodes: each node's own counter would interleave badly.
CREATE SEQUENCE job_sequence;
