-- Admitting a job in one round trip, with the per-user cap exact across nodes (SPEC §9:
-- one user posting on every node at once must not pass `max_pending_per_user`).
--
-- A user's admissions take that user's lock for their transaction, so one counts only
-- after the last has committed; other users are not held up. The job's place in its
-- user's queue is taken here too (job_sequence), and whether an ended job's record was
-- replaced is told (its old record may be held in the nodes' memory: 004).

CREATE FUNCTION admit_job(
    p_kind text, p_id bigint, p_owner text, p_record jsonb, p_reusable text[], p_cap integer,
    OUT outcome text, OUT pending bigint, OUT place bigint
) LANGUAGE plpgsql AS $$
DECLARE
    replaced boolean;
BEGIN
    pending := NULL;
    place := NULL;
    IF p_cap IS NOT NULL THEN
        -- Two-key advisory locks are a space apart from the one-key locks of the nodes,
        -- the gate and the migrations. 0x66612D75 is "fa-u" in ASCII.
        PERFORM pg_advisory_xact_lock(x'66612D75'::integer, hashtext(p_owner));
        SELECT count(*) INTO pending FROM jobs WHERE status = 'pending' AND owner = p_owner;
        IF pending >= p_cap THEN
            outcome := 'too many';
            RETURN;
        END IF;
    END IF;
    place := nextval('job_sequence');
    INSERT INTO jobs (kind, id, record)
        VALUES (p_kind, p_id, p_record || jsonb_build_object('sequence', place))
        ON CONFLICT (kind, id) DO UPDATE SET record = EXCLUDED.record
        WHERE jobs.owner = p_owner AND jobs.status = ANY(p_reusable)
        RETURNING xmax::text <> '0' INTO replaced;
    IF NOT FOUND THEN
        outcome := 'in use';
        place := NULL;
    ELSIF replaced THEN
        outcome := 'replaced';
    ELSE
        outcome := 'admitted';
    END IF;
END
$$;
