-- decide_scans_sequential (the ordered part of decide_scans, 0002's loop) looks a batch's earlier
-- scans up by (device, nonce), with the tenant as a filter.
--
-- Why: its statements named the tenant as an index condition (`organization_id = p_org AND
-- device_id = .. AND nonce = ..`). A plan cached for the session (or made while the tenant was
-- new to the table's statistics) took the tenant's index and read every scan of the tenant,
-- then matched (device, nonce) among them: 2,008 rows read to decide three scans of a tenant
-- with 2,000 (tests/integration/scanning/test_authority_reads.py), and a nested loop of the
-- batch against them for an upload: a 10,000-scan upload with 3,000 repeated tickets took
-- 1.0 s, then 1.9, 3.9 and 4.4 s as the tenant's scans grew by 10,000 an upload. Every retry of
-- a scan (same device and nonce) goes this way too. 0003 did the same for the set-based part
-- (scans_device_nonce_key; `(sc.organization_id = p_org) IS TRUE` is not an index condition).
--
-- Same body as 0002 otherwise: the same decisions and rows.

CREATE OR REPLACE FUNCTION decide_scans_sequential(p_org uuid, p_now timestamptz, p_scans jsonb) RETURNS SETOF jsonb
LANGUAGE plpgsql
-- Every statement here is a key lookup. Plans are cached for the session while the tables grow
-- (a fresh table, or a batch inserting thousands of scans, looks empty to the planner) and a
-- cached sequential scan would make a batch quadratic: keep the planner on the indexes.
SET enable_seqscan = off
AS $$
DECLARE
    s            jsonb;
    t            tickets%ROWTYPE;
    ev           events%ROWTYPE;
    prior        scans%ROWTYPE;
    v_codes      text[];
    v_envelope   jsonb;
    v_priors     jsonb;
    v_key        text;
    v_accepted   uuid[] := '{}';
    v_scan_id    uuid;
    v_result     text;
    v_reason     text;
    v_conflict   boolean;
    v_swap       boolean;
    v_when       timestamptz;
    v_zones      text[];
    v_first_at   timestamptz;
    v_first_gate text;
    v_type       text;
    v_admission  int;
    v_reentry    boolean;
    v_offline    boolean;
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);

    SELECT array_agg(DISTINCT x->>'code') INTO v_codes
    FROM jsonb_array_elements(p_scans) x WHERE x->>'pre' IS NULL;
    PERFORM 1 FROM tickets
    WHERE organization_id = p_org AND ticket_code = ANY (v_codes)
    ORDER BY ticket_code FOR UPDATE;

    -- earlier decisions of this batch's (device, nonce) pairs, found in one statement: a per-scan
    -- lookup would be planned once, on whatever the table looked like then
    SELECT jsonb_object_agg(x.device || chr(31) || x.nonce, sc.scan_id) INTO v_priors
    FROM jsonb_to_recordset(p_scans) AS x(device text, nonce text)
    CROSS JOIN LATERAL (
        -- by (device, nonce), the tenant as a filter, not an index condition (0007)
        SELECT sc.scan_id FROM scans sc
        WHERE sc.device_id = x.device AND sc.nonce = x.nonce AND (sc.organization_id = p_org) IS TRUE
        LIMIT 1
    ) sc;
    v_priors := coalesce(v_priors, '{}');

    FOR s IN SELECT value FROM jsonb_array_elements(p_scans) LOOP
        -- a retry of (device, nonce) gets the first decision and records nothing new
        v_key := (s->>'device') || chr(31) || (s->>'nonce');
        prior := NULL;
        IF v_priors ? v_key THEN
            SELECT * INTO prior FROM scans WHERE scan_id = (v_priors->>v_key)::uuid;
        END IF;
        IF prior.scan_id IS NOT NULL THEN
            RETURN NEXT jsonb_build_object(
                'i', s->'i', 'scan_id', prior.scan_id, 'result', prior.result,
                'reason', prior.reason, 'ticket_type', prior.ticket_type,
                'first_at', prior.first_admitted_at, 'first_gate', prior.first_gate,
                'conflict', prior.conflict, 'replayed', true, 'reentry', NULL);
            CONTINUE;
        END IF;

        v_scan_id := uuidv7();
        v_result := 'rejected'; v_reason := NULL; v_conflict := false; v_swap := false;
        v_first_at := NULL; v_first_gate := NULL; v_type := NULL; v_admission := NULL;
        v_reentry := NULL;
        v_offline := coalesce((s->>'offline')::boolean, false);
        v_when := CASE WHEN v_offline THEN (s->>'scanned_at')::timestamptz ELSE p_now END;
        t := NULL; ev := NULL;

        IF s->>'pre' IS NOT NULL THEN
            v_reason := s->>'pre';
            v_first_at := (s->>'pre_first_at')::timestamptz;
            v_first_gate := s->>'pre_first_gate';
            v_type := s->>'pre_ticket_type';
            -- no lock needed for a known duplicate, but a cancellation another replica consumed
            -- must still win over this replica's cached admission
            IF EXISTS (SELECT 1 FROM tickets WHERE organization_id = p_org
                       AND ticket_code = s->>'code' AND status = 'cancelled') THEN
                v_reason := 'cancelled'; v_first_at := NULL; v_first_gate := NULL;
            END IF;
        ELSE
            SELECT * INTO t FROM tickets WHERE organization_id = p_org AND ticket_code = s->>'code';
            IF NOT FOUND THEN
                v_reason := 'unknown_ticket';
            ELSE
                v_type := t.ticket_type;
                SELECT * INTO ev FROM events WHERE organization_id = p_org AND event_id = t.event_id;
                v_reentry := coalesce(ev.reentry_allowed, false);
                IF s->>'device_event_id' IS NOT NULL
                   AND (s->>'device_event_id')::uuid <> (s->>'event_id')::uuid THEN
                    v_reason := 'device_not_allowed';
                ELSIF t.event_id <> (s->>'event_id')::uuid THEN
                    v_reason := 'wrong_event';
                ELSIF s->>'dir' = 'exit' THEN
                    -- leaving is always allowed for someone inside, also with a cancelled ticket
                    IF t.inside THEN v_result := 'accepted'; ELSE v_reason := 'not_inside'; END IF;
                ELSIF t.status = 'cancelled' THEN
                    v_reason := 'cancelled';
                ELSIF (ev.valid_from IS NOT NULL AND v_when < ev.valid_from)
                      OR (ev.valid_until IS NOT NULL AND v_when > ev.valid_until) THEN
                    v_reason := 'not_valid_now';
                ELSIF s->>'zone' IS NOT NULL AND EXISTS (
                        SELECT 1 FROM ticket_types tt
                        WHERE tt.organization_id = p_org AND tt.event_id = t.event_id
                          AND tt.code = t.ticket_type AND cardinality(tt.zones) > 0
                          AND NOT (s->>'zone' = ANY (tt.zones))) THEN
                    v_reason := 'zone_denied';
                ELSIF t.inside OR (t.entries > 0 AND NOT v_reentry) THEN
                    v_reason := 'already_admitted';
                    v_first_at := t.first_admitted_at;
                    v_first_gate := t.first_gate;
                    -- offline: the earlier of two admissions is the admission, the later one
                    -- the conflict, whichever was uploaded first
                    IF v_offline AND s->>'device_result' = 'accepted' AND t.inside
                       AND t.last_entry_at IS NOT NULL AND v_when < t.last_entry_at THEN
                        v_swap := true;
                    END IF;
                ELSE
                    v_result := 'accepted';
                END IF;
            END IF;
        END IF;

        IF v_offline AND s->>'device_result' = 'rejected' THEN
            -- the device turned the holder away: nobody passed, nothing changes
            v_result := 'rejected';
        ELSIF v_offline AND v_result = 'rejected' AND NOT v_swap THEN
            -- the device let someone through that the rules refuse: recorded, flagged
            v_conflict := true;
        END IF;

        -- what the ticket will look like, decided under its lock
        IF v_swap THEN
            v_result := 'accepted'; v_reason := NULL;
            v_first_at := LEAST(t.first_admitted_at, v_when);
            v_first_gate := CASE WHEN v_when < t.first_admitted_at THEN s->>'gate' ELSE t.first_gate END;
        ELSIF v_result = 'accepted' AND s->>'dir' = 'entry' THEN
            v_admission := t.entries + 1;
            v_first_at := coalesce(t.first_admitted_at, v_when);
            v_first_gate := CASE WHEN t.first_admitted_at IS NULL THEN s->>'gate' ELSE t.first_gate END;
        ELSIF v_result = 'accepted' THEN
            v_first_at := t.first_admitted_at; v_first_gate := t.first_gate;
        END IF;

        INSERT INTO scans (scan_id, organization_id, event_id, ticket_code, ticket_type, direction,
                           gate, zone, device_id, nonce, result, reason, conflict, offline,
                           first_admitted_at, first_gate, admission_no, scanned_at, received_at)
        VALUES (v_scan_id, p_org, (s->>'event_id')::uuid, s->>'code', v_type, s->>'dir',
                s->>'gate', s->>'zone', s->>'device', s->>'nonce', v_result, v_reason, v_conflict,
                v_offline, v_first_at, v_first_gate, v_admission,
                (s->>'scanned_at')::timestamptz, p_now)
        ON CONFLICT (organization_id, device_id, nonce) DO NOTHING;
        IF NOT FOUND THEN
            -- the same (device, nonce) twice in one batch: the first one's decision stands
            SELECT * INTO prior FROM scans
            WHERE device_id = s->>'device' AND nonce = s->>'nonce' AND (organization_id = p_org) IS TRUE;
            RETURN NEXT jsonb_build_object(
                'i', s->'i', 'scan_id', prior.scan_id, 'result', prior.result,
                'reason', prior.reason, 'ticket_type', prior.ticket_type,
                'first_at', prior.first_admitted_at, 'first_gate', prior.first_gate,
                'conflict', prior.conflict, 'replayed', true, 'reentry', NULL);
            CONTINUE;
        END IF;

        IF v_swap THEN
            -- the earlier offline entry becomes the admission; the later one is the conflict
            UPDATE scans SET conflict = true, admission_no = NULL
            WHERE scan_id = t.last_entry_scan_id AND (organization_id = p_org) IS TRUE;
            UPDATE scans SET admission_no = t.entries WHERE scan_id = v_scan_id;
            UPDATE tickets SET
                last_entry_at = v_when, last_entry_scan_id = v_scan_id,
                first_admitted_at = v_first_at, first_gate = v_first_gate
            WHERE organization_id = p_org AND ticket_code = t.ticket_code;
        ELSIF v_result = 'accepted' AND s->>'dir' = 'entry' THEN
            -- the conditional state change: only a ticket that is outside goes inside
            UPDATE tickets SET
                inside = true, entries = entries + 1,
                first_admitted_at = v_first_at, first_gate = v_first_gate,
                last_entry_at = v_when, last_entry_scan_id = v_scan_id
            WHERE organization_id = p_org AND ticket_code = t.ticket_code AND NOT inside;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'ticket % changed under its lock', t.ticket_code;
            END IF;
            v_accepted := v_accepted || v_scan_id;
        ELSIF v_result = 'accepted' THEN
            UPDATE tickets SET inside = false, exits = exits + 1
            WHERE organization_id = p_org AND ticket_code = t.ticket_code AND inside;
            IF NOT FOUND THEN
                RAISE EXCEPTION 'ticket % changed under its lock', t.ticket_code;
            END IF;
            v_accepted := v_accepted || v_scan_id;
        END IF;

        RETURN NEXT jsonb_build_object(
            'i', s->'i', 'scan_id', v_scan_id, 'result', v_result, 'reason', v_reason,
            'ticket_type', v_type, 'first_at', v_first_at, 'first_gate', v_first_gate,
            'conflict', v_conflict, 'replayed', false, 'reentry', v_reentry, 'swap', v_swap);
        v_envelope := jsonb_build_object(
            'event_id', uuidv7(),
            'type', CASE WHEN v_result = 'accepted' THEN 'scan.accepted' ELSE 'scan.rejected' END,
            'schema_version', 1,
            'occurred_at', p_now,
            'org_id', p_org,
            'actor', s->'actor',
            'correlation_id', s->>'corr',
            'causation_id', NULL,
            'data', jsonb_build_object(
                'scan_id', v_scan_id, 'event_id', s->>'event_id', 'ticket_code', s->>'code',
                'ticket_type', v_type, 'direction', s->>'dir', 'gate', s->>'gate',
                'zone', s->>'zone', 'device_id', s->>'device', 'nonce', s->>'nonce',
                'scanned_at', s->>'scanned_at', 'received_at', p_now, 'offline', v_offline)
                || CASE WHEN v_result = 'accepted' THEN '{}'::jsonb
                        ELSE jsonb_build_object('reason', v_reason, 'conflict', v_conflict) END);
        INSERT INTO outbox (event_id, organization_id, subject, payload)
        VALUES ((v_envelope->>'event_id')::uuid, p_org,
                'vge.evt.' || p_org || '.scanning.' || (v_envelope->>'type'),
                convert_to(v_envelope::text, 'UTF8'));
    END LOOP;

    IF cardinality(v_accepted) > 0 THEN
        -- occupancy first, then the dirty mark (publish_occupancy_changes relies on that order)
        INSERT INTO occupancy AS o (organization_id, event_id, inside, entries, exits, version, updated_at)
        SELECT p_org, event_id,
               count(*) FILTER (WHERE direction = 'entry') - count(*) FILTER (WHERE direction = 'exit'),
               count(*) FILTER (WHERE direction = 'entry'),
               count(*) FILTER (WHERE direction = 'exit'), 1, p_now
        FROM scans WHERE scan_id = ANY (v_accepted)
        GROUP BY event_id ORDER BY event_id
        ON CONFLICT (organization_id, event_id) DO UPDATE SET
            inside = o.inside + excluded.inside, entries = o.entries + excluded.entries,
            exits = o.exits + excluded.exits, version = o.version + 1,
            updated_at = excluded.updated_at;

        INSERT INTO occupancy_counts AS c (organization_id, event_id, dimension, key, entries, exits)
        SELECT p_org, event_id, dim, key,
               count(*) FILTER (WHERE direction = 'entry'), count(*) FILTER (WHERE direction = 'exit')
        FROM (SELECT event_id, direction, 'gate' AS dim, coalesce(gate, '') AS key
              FROM scans WHERE scan_id = ANY (v_accepted)
              UNION ALL
              SELECT event_id, direction, 'ticket_type', coalesce(ticket_type, '')
              FROM scans WHERE scan_id = ANY (v_accepted)) x
        GROUP BY event_id, dim, key ORDER BY event_id, dim, key
        ON CONFLICT (organization_id, event_id, dimension, key) DO UPDATE SET
            entries = c.entries + excluded.entries, exits = c.exits + excluded.exits;

        INSERT INTO occupancy_dirty (organization_id, event_id)
        SELECT DISTINCT p_org, event_id FROM scans WHERE scan_id = ANY (v_accepted)
        ON CONFLICT DO NOTHING;
    END IF;

    RETURN;
END $$;
