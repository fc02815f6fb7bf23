-- What the cluster schedules with: node leases, and the line of users waiting for a turn
-- (SPEC §9: the next free slot goes to the user who has waited longest for a turn).

-- A node is alive while its heartbeat is younger than the lease.
CREATE TABLE nodes (
    name text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- One clock for the line: when a job became pending (jobs.queued) and when a user last had
-- a turn (turns.turn). A sequence, not timestamps: the nodes' clocks need not agree.
CREATE SEQUENCE line_clock;

ALTER TABLE jobs ADD COLUMN queued bigint;

CREATE TABLE turns (
    owner text PRIMARY KEY,
    turn bigint NOT NULL
);

-- A job that becomes pending (new, or put back) takes the next tick of the line clock and
-- belongs to no node; set here so that every way of writing a record does it.
CREATE FUNCTION jobs_became_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.record ->> 'status' = 'pending'
        AND (TG_OP = 'INSERT' OR OLD.record ->> 'status' IS DISTINCT FROM 'pending') THEN
        NEW.queued := nextval('line_clock');
        NEW.node := NULL;
        NEW.claimed_at := NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER jobs_became_pending BEFORE INSERT OR UPDATE OF record ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_became_pending();

UPDATE jobs SET queued = nextval('line_clock') WHERE status = 'pending';

-- Claims: the pending jobs of each user in queue order; the running jobs of each node.
CREATE INDEX jobs_pending ON jobs (owner, sequence) WHERE status = 'pending';
CREATE INDEX jobs_running ON jobs (node) WHERE status = 'running';
