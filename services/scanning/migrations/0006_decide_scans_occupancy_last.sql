-- decide_scans writes occupancy last: after the scans it decides in order, not before them.
--
-- Why: occupancy, occupancy_counts and occupancy_dirty hold one row per event (and gate, ticket
-- type) that every batch of the event updates, and an updated row stays locked until the commit.
-- 0003 wrote them right after the set-based part, so a big offline upload held them through the
-- rest of its work, the ordered loop (decide_scans_sequential) above all, and every online
-- batch of the event that admitted someone waited for the whole upload. An upload of 10,000
-- scans of which 3,000 repeat a ticket (decided by the loop) held online admissions of the
-- event for 0.3-2.7 s. Now they are the function's last statements (the ordered part writes its
-- own at its end, just before), so an online batch waits at most for the tail of an upload.
--
-- Same decisions, same rows written; only the order of the statements changed. The set-based
-- part's results are returned before the occupancy statements too (they are only collected).

CREATE OR REPLACE FUNCTION decide_scans(p_org uuid, p_now timestamptz, p_scans jsonb) RETURNS SETOF jsonb
LANGUAGE plpgsql
-- as in 0002: every statement is a key lookup; keep the planner on the indexes while tables grow
-- (plans are cached for the session, and were made when the tables looked empty). Statements
-- join only through LATERAL key lookups, so no cached plan can turn into a loop over a table.
SET enable_seqscan = off
-- (0005; CREATE OR REPLACE resets a function's settings to the ones given here)
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_codes    text[];
    v_set      scan_decision[];
    v_rest     jsonb;
    v_n        int;
    v_accepted int;
    v_changes  jsonb;
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);

    -- every ticket of the batch, locked in ticket-code order (two replicas never deadlock); the
    -- statements below start after the locks are held, so they read the tickets' latest state
    SELECT array_agg(DISTINCT x->>'code') INTO v_codes
    FROM jsonb_array_elements(p_scans) x WHERE x->>'pre' IS NULL;
    PERFORM 1 FROM tickets
    WHERE organization_id = p_org AND ticket_code = ANY (v_codes)
    ORDER BY ticket_code FOR UPDATE;

    WITH x AS (
        SELECT r.*, e.value AS raw, e.ord,
               coalesce(r.offline, false) AS off,
               count(*) OVER (PARTITION BY r.code) AS code_uses,
               count(*) OVER (PARTITION BY r.device, r.nonce) AS nonce_uses
        FROM jsonb_array_elements(p_scans) WITH ORDINALITY AS e(value, ord),
             jsonb_to_record(e.value) AS r(
                 i int, event_id uuid, code text, dir text, gate text, zone text, device text,
                 nonce text, scanned_at text, offline boolean, device_result text,
                 device_event_id uuid, actor jsonb, corr text, pre text,
                 pre_first_at timestamptz, pre_first_gate text, pre_ticket_type text)
    ),
    j AS (
        SELECT x.*,
               CASE WHEN x.off THEN x.scanned_at::timestamptz ELSE p_now END AS at_when,
               t.ticket_code IS NOT NULL AS found, t.event_id AS t_event, t.ticket_type AS t_type,
               t.status, t.inside, t.entries, t.first_admitted_at, t.first_gate AS t_first_gate,
               t.last_entry_at,
               coalesce(ev.reentry_allowed, false) AS reentry_allowed, ev.valid_from, ev.valid_until,
               coalesce(x.zone IS NOT NULL AND cardinality(tt.zones) > 0
                        AND NOT (x.zone = ANY (tt.zones)), false) AS zone_denied,
               coalesce(tc.status = 'cancelled', false) AS pre_cancelled,
               sc.scan_id IS NOT NULL AS has_prior
        -- one key lookup per scan (LATERAL ... LIMIT 1 keeps it so: planned as a join, a fresh
        -- table's statistics would make it a scan of the tenant's every ticket)
        FROM x
        LEFT JOIN LATERAL (
            SELECT * FROM tickets t
            WHERE x.pre IS NULL AND t.organization_id = p_org AND t.ticket_code = x.code LIMIT 1
        ) t ON true
        LEFT JOIN LATERAL (
            SELECT * FROM events ev
            WHERE ev.organization_id = p_org AND ev.event_id = t.event_id LIMIT 1
        ) ev ON true
        LEFT JOIN LATERAL (
            SELECT tt.zones FROM ticket_types tt
            WHERE tt.organization_id = p_org AND tt.event_id = t.event_id AND tt.code = t.ticket_type
            LIMIT 1
        ) tt ON true
        LEFT JOIN LATERAL (
            SELECT tc.status FROM tickets tc
            WHERE x.pre IS NOT NULL AND tc.organization_id = p_org AND tc.ticket_code = x.code LIMIT 1
        ) tc ON true
        LEFT JOIN LATERAL (
            -- the tenant as a filter, not an index condition (see scans_device_nonce_key)
            SELECT sc.scan_id FROM scans sc
            WHERE sc.device_id = x.device AND sc.nonce = x.nonce AND (sc.organization_id = p_org) IS TRUE
            LIMIT 1
        ) sc ON true
    ),
    k AS (
        SELECT j.*,
               -- what needs the ordered loop: a ticket twice in the batch, a (device, nonce) seen
               -- before or twice, an offline admission earlier than the ticket's current one
               (j.code_uses > 1 OR j.nonce_uses > 1 OR j.has_prior
                OR (j.off AND j.device_result = 'accepted' AND coalesce(j.inside, false)
                    AND j.last_entry_at IS NOT NULL AND j.at_when < j.last_entry_at)) AS ordered,
               -- the rules of 0002, in the same order; NULL: the rules admit the scan
               CASE
                   WHEN j.pre IS NOT NULL THEN CASE WHEN j.pre_cancelled THEN 'cancelled' ELSE j.pre END
                   WHEN NOT j.found THEN 'unknown_ticket'
                   WHEN j.device_event_id IS NOT NULL AND j.device_event_id <> j.event_id THEN 'device_not_allowed'
                   WHEN j.t_event <> j.event_id THEN 'wrong_event'
                   WHEN j.dir = 'exit' THEN CASE WHEN j.inside THEN NULL ELSE 'not_inside' END
                   WHEN j.status = 'cancelled' THEN 'cancelled'
                   WHEN (j.valid_from IS NOT NULL AND j.at_when < j.valid_from)
                        OR (j.valid_until IS NOT NULL AND j.at_when > j.valid_until) THEN 'not_valid_now'
                   WHEN j.zone_denied THEN 'zone_denied'
                   WHEN j.inside OR (j.entries > 0 AND NOT j.reentry_allowed) THEN 'already_admitted'
               END AS rule_reason
        FROM j
    ),
    d AS (
        SELECT k.*,
               CASE WHEN k.pre IS NULL AND k.rule_reason IS NULL
                         AND NOT (k.off AND k.device_result = 'rejected')
                    THEN 'accepted' ELSE 'rejected' END AS result
        FROM k
    )
    SELECT
        array_agg(ROW(
            d.i, uuidv7(), d.event_id, d.code, d.dir, d.gate, d.zone, d.device, d.nonce,
            d.scanned_at, d.off, d.result, d.rule_reason,
            -- offline: the device let someone through that the rules refuse
            d.off AND NOT coalesce(d.device_result = 'rejected', false) AND d.result = 'rejected',
            CASE WHEN d.pre IS NOT NULL THEN d.pre_ticket_type ELSE d.t_type END,
            CASE WHEN d.pre IS NOT NULL THEN CASE WHEN d.pre_cancelled THEN NULL ELSE d.pre_first_at END
                 WHEN d.result = 'accepted' AND d.dir = 'entry' THEN coalesce(d.first_admitted_at, d.at_when)
                 WHEN d.result = 'accepted' OR d.rule_reason = 'already_admitted' THEN d.first_admitted_at
            END,
            CASE WHEN d.pre IS NOT NULL THEN CASE WHEN d.pre_cancelled THEN NULL ELSE d.pre_first_gate END
                 WHEN d.result = 'accepted' AND d.dir = 'entry'
                      THEN CASE WHEN d.first_admitted_at IS NULL THEN d.gate ELSE d.t_first_gate END
                 WHEN d.result = 'accepted' OR d.rule_reason = 'already_admitted' THEN d.t_first_gate
            END,
            CASE WHEN d.result = 'accepted' AND d.dir = 'entry' THEN d.entries + 1 END,
            d.at_when,
            CASE WHEN d.pre IS NULL AND d.found THEN d.reentry_allowed END,
            d.actor, d.corr
        )::scan_decision ORDER BY d.ord) FILTER (WHERE NOT d.ordered),
        jsonb_agg(d.raw ORDER BY d.ord) FILTER (WHERE d.ordered)
    INTO v_set, v_rest
    FROM d;

    IF v_set IS NOT NULL THEN
        -- every scan is recorded, accepted or rejected
        WITH ins AS (
            INSERT INTO scans (scan_id, organization_id, event_id, ticket_code, ticket_type, direction,
                               gate, zone, device_id, nonce, result, reason, conflict, offline,
                               first_admitted_at, first_gate, admission_no, scanned_at, received_at)
            SELECT s.scan_id, p_org, s.event_id, s.code, s.ticket_type, s.dir, s.gate, s.zone,
                   s.device, s.nonce, s.result, s.reason, s.conflict, s.offline, s.first_at,
                   s.first_gate, s.admission, s.scanned_at::timestamptz, p_now
            FROM unnest(v_set) s
            ON CONFLICT (organization_id, device_id, nonce) DO NOTHING
            RETURNING 1
        )
        SELECT count(*) INTO v_n FROM ins;
        IF v_n < cardinality(v_set) THEN
            -- another replica recorded one of these (device, nonce) pairs just now: decide the
            -- batch again, when that scan is visible and is replayed by the loop
            RAISE EXCEPTION 'a (device, nonce) of this batch was recorded concurrently'
                USING ERRCODE = 'serialization_failure';
        END IF;

        -- the conditional state change: only a ticket outside goes in, only one inside goes out.
        -- Each ticket's change comes from a map keyed by its code (codes are unique in this part),
        -- not from a join: a join's plan follows the statistics, and a stale estimate made it a
        -- nested loop over every scan of the batch for every ticket.
        SELECT jsonb_object_agg(s.code, jsonb_build_object(
                   'entry', s.dir = 'entry', 'first_at', s.first_at, 'first_gate', s.first_gate,
                   'at', s.at_when, 'scan_id', s.scan_id)), count(*)
        INTO v_changes, v_accepted
        FROM unnest(v_set) s WHERE s.result = 'accepted';
        UPDATE tickets t SET
            inside = (v_changes->t.ticket_code->>'entry')::boolean,
            entries = t.entries + ((v_changes->t.ticket_code->>'entry')::boolean)::int,
            exits = t.exits + (NOT (v_changes->t.ticket_code->>'entry')::boolean)::int,
            first_admitted_at = CASE WHEN (v_changes->t.ticket_code->>'entry')::boolean
                                     THEN (v_changes->t.ticket_code->>'first_at')::timestamptz
                                     ELSE t.first_admitted_at END,
            first_gate = CASE WHEN (v_changes->t.ticket_code->>'entry')::boolean
                              THEN v_changes->t.ticket_code->>'first_gate' ELSE t.first_gate END,
            last_entry_at = CASE WHEN (v_changes->t.ticket_code->>'entry')::boolean
                                 THEN (v_changes->t.ticket_code->>'at')::timestamptz
                                 ELSE t.last_entry_at END,
            last_entry_scan_id = CASE WHEN (v_changes->t.ticket_code->>'entry')::boolean
                                      THEN (v_changes->t.ticket_code->>'scan_id')::uuid
                                      ELSE t.last_entry_scan_id END
        WHERE t.organization_id = p_org
          AND t.ticket_code = ANY (ARRAY(SELECT jsonb_object_keys(coalesce(v_changes, '{}'))))
          AND t.inside = NOT (v_changes->t.ticket_code->>'entry')::boolean;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        IF v_n <> v_accepted THEN
            RAISE EXCEPTION 'a ticket of this batch changed under its lock';
        END IF;

        -- json, not jsonb: the payload is text on the wire, and building jsonb only to print it
        -- again was a third of this statement's time
        INSERT INTO outbox (event_id, organization_id, subject, payload)
        SELECT ev_id, p_org, 'vge.evt.' || p_org || '.scanning.' || ev_type,
               convert_to(json_build_object(
                   'event_id', ev_id, 'type', ev_type, 'schema_version', 1, 'occurred_at', p_now,
                   'org_id', p_org, 'actor', s.actor, 'correlation_id', s.corr, 'causation_id', NULL,
                   'data', CASE WHEN s.result = 'accepted' THEN json_build_object(
                       'scan_id', s.scan_id, 'event_id', s.event_id, 'ticket_code', s.code,
                       'ticket_type', s.ticket_type, 'direction', s.dir, 'gate', s.gate,
                       'zone', s.zone, 'device_id', s.device, 'nonce', s.nonce,
                       'scanned_at', s.scanned_at, 'received_at', p_now, 'offline', s.offline)
                   ELSE json_build_object(
                       'scan_id', s.scan_id, 'event_id', s.event_id, 'ticket_code', s.code,
                       'ticket_type', s.ticket_type, 'direction', s.dir, 'gate', s.gate,
                       'zone', s.zone, 'device_id', s.device, 'nonce', s.nonce,
                       'scanned_at', s.scanned_at, 'received_at', p_now, 'offline', s.offline,
                       'reason', s.reason, 'conflict', s.conflict) END
               )::text, 'UTF8')
        FROM (SELECT s.*, uuidv7() AS ev_id,
                     CASE WHEN s.result = 'accepted' THEN 'scan.accepted' ELSE 'scan.rejected' END AS ev_type
              FROM unnest(v_set) s) s;

        RETURN QUERY
        SELECT jsonb_build_object(
            'i', s.i, 'scan_id', s.scan_id, 'result', s.result, 'reason', s.reason,
            'ticket_type', s.ticket_type, 'first_at', s.first_at, 'first_gate', s.first_gate,
            'conflict', s.conflict, 'replayed', false, 'reentry', s.reentry, 'swap', false)
        FROM unnest(v_set) s;
    END IF;

    IF v_rest IS NOT NULL THEN
        RETURN QUERY SELECT * FROM decide_scans_sequential(p_org, p_now, v_rest);
    END IF;

    -- Last: the event's occupancy rows are the one thing every batch of the event writes, and
    -- each is locked from here to the commit. Written earlier, an upload held them (and every
    -- online scan of the event) for the rest of its work: the ordered part's loop above all.
    IF v_accepted > 0 THEN  -- (NULL: no set-based part)
        -- occupancy first, then the dirty mark (publish_occupancy_changes relies on that order)
        INSERT INTO occupancy AS o (organization_id, event_id, inside, entries, exits, version, updated_at)
        SELECT p_org, s.event_id,
               count(*) FILTER (WHERE s.dir = 'entry') - count(*) FILTER (WHERE s.dir = 'exit'),
               count(*) FILTER (WHERE s.dir = 'entry'),
               count(*) FILTER (WHERE s.dir = 'exit'), 1, p_now
        FROM unnest(v_set) s WHERE s.result = 'accepted'
        GROUP BY s.event_id ORDER BY s.event_id
        ON CONFLICT (organization_id, event_id) DO UPDATE SET
            inside = o.inside + excluded.inside, entries = o.entries + excluded.entries,
            exits = o.exits + excluded.exits, version = o.version + 1,
            updated_at = excluded.updated_at;

        INSERT INTO occupancy_counts AS c (organization_id, event_id, dimension, key, entries, exits)
        SELECT p_org, x.event_id, x.dim, x.key,
               count(*) FILTER (WHERE x.dir = 'entry'), count(*) FILTER (WHERE x.dir = 'exit')
        FROM (SELECT s.event_id, s.dir, 'gate' AS dim, coalesce(s.gate, '') AS key
              FROM unnest(v_set) s WHERE s.result = 'accepted'
              UNION ALL
              SELECT s.event_id, s.dir, 'ticket_type', coalesce(s.ticket_type, '')
              FROM unnest(v_set) s WHERE s.result = 'accepted') x
        GROUP BY x.event_id, x.dim, x.key ORDER BY x.event_id, x.dim, x.key
        ON CONFLICT (organization_id, event_id, dimension, key) DO UPDATE SET
            entries = c.entries + excluded.entries, exits = c.exits + excluded.exits;

        INSERT INTO occupancy_dirty (organization_id, event_id)
        SELECT DISTINCT p_org, s.event_id FROM unnest(v_set) s WHERE s.result = 'accepted'
        ON CONFLICT DO NOTHING;
    END IF;

    RETURN;
END $$;
