-- Nodes keep finished job records in memory (fa_restic.cluster.finished): a GET of one is
-- then answered without a round trip. A finished record is changed only by a delete, an id
-- used again, or an operator; every such change is told to every node here, whoever makes
-- it, so that no way of writing a record can leave a node holding the old one.
--
-- Channel "fa_restic_finished": "<kind> <id>" for each finished record changed, or "*"
-- (forget them all) after the first 100 of one transaction, so that a destroy of a million
-- records is one message, not a million. The transaction's count is also what tells the
-- writing node it must wait for every node to have forgotten them (fa_restic.finished.changed).

CREATE FUNCTION jobs_finished_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed integer := coalesce(nullif(current_setting('fa_restic.finished_changed', true), ''), '0')::integer + 1;
BEGIN
    PERFORM set_config('fa_restic.finished_changed', changed::text, true);
    IF changed <= 100 THEN
        PERFORM pg_notify('fa_restic_finished', OLD.kind || ' ' || OLD.id);
    ELSIF changed = 101 THEN
        PERFORM pg_notify('fa_restic_finished', '*');
    END IF;
    RETURN NULL;
END
$$;

-- A live record (pending, running, unsettled) is never held by a node's memory: changes to
-- it need no message, and the WHEN clause keeps the claims' and progress's updates free.
CREATE TRIGGER jobs_finished_changed AFTER UPDATE OR DELETE ON jobs
    FOR EACH ROW WHEN (NOT OLD.live) EXECUTE FUNCTION jobs_finished_changed();

CREATE FUNCTION jobs_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('fa_restic.finished_changed', '101', true);
    PERFORM pg_notify('fa_restic_finished', '*');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_truncated AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_truncated();
