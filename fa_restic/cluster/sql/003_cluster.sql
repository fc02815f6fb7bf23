-- What nodes tell each other about the jobs they run (SPEC §10): the live progress the node
-- running a job publishes (a GET on another node shows it, at most 2 s old), and a cancel
-- another node asked for (the running node stops the job within the cancel's bound).

ALTER TABLE jobs ADD COLUMN progress jsonb;
ALTER TABLE jobs ADD COLUMN cancel_by text;

-- As 002_nodes.sql's, and a job put back to pending starts afresh: no progress of an
-- earlier attempt, no cancel asked of the node that no longer runs it.
CREATE OR REPLACE FUNCTION jobs_became_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.record ->> 'status' = 'pending'
        AND (TG_OP = 'INSERT' OR OLD.record ->> 'status' IS DISTINCT FROM 'pending') THEN
        NEW.queued := nextval('line_clock');
        NEW.node := NULL;
        NEW.claimed_at := NULL;
        NEW.progress := NULL;
        NEW.cancel_by := NULL;
    END IF;
    RETURN NEW;
END
$$;
