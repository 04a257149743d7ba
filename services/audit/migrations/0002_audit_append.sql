-- Appending a batch in a fixed number of round trips, whatever the number of tenants in it.
-- Both functions run as the caller (SECURITY INVOKER): the service's login role, with row-level
-- security, each tenant set with set_config(..., true) (SET LOCAL) before its rows are touched.

-- Neither function has a SET search_path clause: setting it on every call cost more than a
-- small batch's work; the service's connections and the migrations resolve these tables in
-- the audit schema first. lock_chain_heads finds recorded events through the event_id index
-- (orgs[i] is the tenant of event_ids[i]), one probe per event.

CREATE FUNCTION lock_chain_heads(orgs uuid[], event_ids uuid[])
RETURNS TABLE (head_org uuid, head_seq bigint, head_hash text, known uuid[])
LANGUAGE plpgsql AS $$
DECLARE
    org uuid;
BEGIN
    FOR org IN SELECT DISTINCT o FROM unnest(orgs) AS o ORDER BY o LOOP
        PERFORM set_config('vge.org_id', org::text, true);
        SELECT h.last_seq, h.last_hash INTO head_seq, head_hash
            FROM chain_heads h WHERE h.organization_id = org FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO chain_heads (organization_id, last_seq, last_hash)
                VALUES (org, 0, repeat('0', 64)) ON CONFLICT (organization_id) DO NOTHING;
            SELECT h.last_seq, h.last_hash INTO head_seq, head_hash
                FROM chain_heads h WHERE h.organization_id = org FOR UPDATE;
        END IF;
        head_org := org;
        -- a statement of its own, after the lock: it sees what another instance committed
        -- while this one waited
        known := ARRAY(SELECT r.event_id
                       FROM unnest(orgs, event_ids) AS x(o, id)
                       JOIN records r ON r.event_id = x.id
                       WHERE x.o = org);
        RETURN NEXT;
    END LOOP;
END $$;

-- Insert the chained records of every tenant of a batch and move each tenant's head, which must
-- be where the records start (a head moved by anyone else is an error, never a fork).
-- Row i of the record arrays belongs to tenant orgs[i]; heads are given per tenant.
CREATE FUNCTION append_records(
    orgs uuid[], seqs bigint[], event_ids uuid[], actions text[], resource_types text[],
    resource_ids text[], user_ids text[], actor_orgs uuid[], roles text[], admins boolean[],
    staff boolean[], actor_types text[], changes text[], correlation_ids text[],
    causation_ids text[], occurred timestamptz[], recorded timestamptz, prev_hashes text[],
    hashes text[], head_orgs uuid[], head_seqs bigint[], head_hashes text[]
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    i int;
    added bigint;
    total bigint := 0;
BEGIN
    FOR i IN 1 .. coalesce(array_length(head_orgs, 1), 0) LOOP
        PERFORM set_config('vge.org_id', head_orgs[i]::text, true);
        INSERT INTO records (
            organization_id, seq, event_id, action, resource_type, resource_id, actor_user_id,
            actor_organization_id, actor_role, actor_is_platform_admin, actor_is_platform_staff,
            actor_type, change, correlation_id, causation_id, occurred_at, recorded_at,
            prev_hash, hash)
        SELECT t.org, t.seq, t.event_id, t.action, t.resource_type, t.resource_id, t.user_id,
               t.actor_org, t.role, t.is_admin, t.is_staff, t.actor_type, t.change::json,
               t.correlation_id, t.causation_id, t.occurred_at, recorded, t.prev_hash, t.hash
        FROM unnest(orgs, seqs, event_ids, actions, resource_types, resource_ids, user_ids,
                    actor_orgs, roles, admins, staff, actor_types, changes, correlation_ids,
                    causation_ids, occurred, prev_hashes, hashes)
             AS t(org, seq, event_id, action, resource_type, resource_id, user_id, actor_org,
                  role, is_admin, is_staff, actor_type, change, correlation_id, causation_id,
                  occurred_at, prev_hash, hash)
        WHERE t.org = head_orgs[i];
        GET DIAGNOSTICS added = ROW_COUNT;
        UPDATE chain_heads
            SET last_seq = head_seqs[i], last_hash = head_hashes[i], updated_at = now()
            WHERE organization_id = head_orgs[i] AND last_seq = head_seqs[i] - added;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'chain head of % is not where its % new records start',
                head_orgs[i], added;
        END IF;
        total := total + added;
    END LOOP;
    RETURN total;
END $$;
