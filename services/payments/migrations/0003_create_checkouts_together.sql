-- Concurrent checkouts created together (design §6; the rules of 0002's checkout_create, in
-- batches).
--
-- checkout_create for several checkouts of one tenant at once (concurrent requests gathered by
-- the service while the previous batch is in flight): one statement, one commit, the popular
-- ticket type's row locked once for all of them. Each checkout succeeds or fails on its own
-- (sold out, stale price, an earlier Idempotency-Key); a database error fails the whole batch,
-- and the service then retries its checkouts one by one with checkout_create.
-- Items and events are flat arrays naming their checkout by position (1-based).
CREATE FUNCTION checkout_create_many(
    p_org uuid, p_ids uuid[], p_events uuid[], p_emails text[], p_totals bigint[],
    p_currencies text[], p_expires timestamptz[], p_create_keys text[],
    p_item_of integer[], p_type_ids uuid[], p_codes text[], p_quantities integer[],
    p_prices bigint[],
    p_event_of integer[], p_event_ids uuid[], p_subjects text[], p_payloads bytea[]
) RETURNS TABLE (i integer, existing uuid, error text, ticket_type text, available integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    n        integer := coalesce(array_length(p_ids, 1), 0);
    k        integer;
    r        record;
    v_id     uuid;
    v_ok     integer[] := '{}';
    v_failed boolean;
    v_rows   integer;
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    -- every type row the batch reserves, locked in id order: batches of several replicas
    -- never deadlock, and the checks below cannot be raced
    PERFORM 1 FROM ticket_types tt
     WHERE tt.organization_id = p_org AND tt.id = ANY (p_type_ids)
     ORDER BY tt.id FOR NO KEY UPDATE;
    FOR k IN 1 .. n LOOP
        IF p_create_keys[k] IS NOT NULL THEN
            SELECT c.id INTO v_id FROM checkouts c
             WHERE c.organization_id = p_org AND c.create_key = p_create_keys[k];
            IF FOUND THEN
                i := k; existing := v_id; error := NULL; ticket_type := NULL; available := NULL;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        v_failed := false;
        -- check every item first (the rows are ours until COMMIT), then take the stock
        FOR r IN SELECT t.code, t.qty, tt.id AS found, tt.quantity - tt.reserved AS left_now
                   FROM unnest(p_item_of, p_type_ids, p_codes, p_quantities, p_prices)
                        AS t(pos, id, code, qty, price)
                   LEFT JOIN ticket_types tt
                     ON tt.organization_id = p_org AND tt.id = t.id AND tt.event_id = p_events[k]
                    AND tt.code = t.code AND tt.price = t.price AND tt.currency = p_currencies[k]
                  WHERE t.pos = k ORDER BY t.id LOOP
            IF r.found IS NULL THEN
                i := k; existing := NULL; error := 'catalog_changed'; ticket_type := r.code;
                available := NULL;
                RETURN NEXT; v_failed := true; EXIT;
            ELSIF r.qty > r.left_now THEN
                i := k; existing := NULL; error := 'sold_out'; ticket_type := r.code;
                available := greatest(r.left_now, 0);
                RETURN NEXT; v_failed := true; EXIT;
            END IF;
        END LOOP;
        IF v_failed THEN
            CONTINUE;
        END IF;
        UPDATE ticket_types tt SET reserved = tt.reserved + t.qty
          FROM (SELECT x.id, sum(x.qty) AS qty
                  FROM unnest(p_item_of, p_type_ids, p_quantities) AS x(pos, id, qty)
                 WHERE x.pos = k GROUP BY x.id) t
         WHERE tt.organization_id = p_org AND tt.id = t.id AND tt.reserved + t.qty <= tt.quantity;
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        IF v_rows <> (SELECT count(DISTINCT x.id) FROM unnest(p_item_of, p_type_ids) AS x(pos, id)
                       WHERE x.pos = k) THEN
            -- cannot happen (checked above under the row locks); never book holds the stock
            -- counter does not count: fail the batch, the checkouts go one by one
            RAISE EXCEPTION 'checkout % could not take its stock', p_ids[k];
        END IF;
        v_ok := v_ok || k;
        i := k; existing := NULL; error := NULL; ticket_type := NULL; available := NULL;
        RETURN NEXT;
    END LOOP;
    INSERT INTO checkouts (organization_id, id, event_id, customer_email, status, total,
                           currency, expires_at, create_key)
    SELECT p_org, c.id, c.ev, c.email, 'pending', c.total, c.cur, c.exp, c.ck
      FROM unnest(p_ids, p_events, p_emails, p_totals, p_currencies, p_expires, p_create_keys)
           WITH ORDINALITY AS c(id, ev, email, total, cur, exp, ck, n)
     WHERE c.n = ANY (v_ok);
    INSERT INTO holds (organization_id, checkout_id, ticket_type_id, ticket_type, quantity,
                       unit_price, expires_at)
    SELECT p_org, p_ids[t.pos], t.id, t.code, t.qty, t.price, p_expires[t.pos]
      FROM unnest(p_item_of, p_type_ids, p_codes, p_quantities, p_prices)
           AS t(pos, id, code, qty, price)
     WHERE t.pos = ANY (v_ok);
    INSERT INTO outbox (event_id, organization_id, subject, payload)
    SELECT x.e, p_org, x.s, x.p
      FROM unnest(p_event_of, p_event_ids, p_subjects, p_payloads) AS x(pos, e, s, p)
     WHERE x.pos = ANY (v_ok);
END $$;

-- checkout_finish for several sagas of one tenant at once: charging -> completed for each,
-- with its charge, its balanced sale, its tickets, its consumed holds and its events, in one
-- statement and one commit. Only sagas still in 'charging' are finished (the others get false
-- and nothing is written for them; p_completions: the replies as JSON text). The saga locks stay with their runners, who let go of
-- them after this has committed. A database error fails the whole batch; the service then
-- finishes each saga on its own with checkout_finish (and compensates those that fail).
-- Tickets, lines and events are flat arrays naming their saga by position (1-based).
CREATE FUNCTION checkout_finish_many(
    p_org uuid, p_ids uuid[], p_charge_ids text[], p_completions text[], p_events uuid[],
    p_at timestamptz[],  -- each saga's posting and issuing time (its events say the same)
    p_ticket_of integer[], p_codes text[], p_type_ids uuid[], p_type_codes text[],
    p_entry_ids uuid[], p_entry_descriptions text[],
    p_line_of integer[], p_accounts text[], p_sides text[], p_amounts bigint[],
    p_currencies text[],
    p_event_of integer[], p_event_ids uuid[], p_subjects text[], p_payloads bytea[]
) RETURNS boolean[]
LANGUAGE plpgsql AS $$
DECLARE
    v_moved integer[];
    v_entry uuid;
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    WITH moved AS (
        UPDATE checkouts c
           SET status = 'completed', charge_id = x.charge_id, completion = x.completion::jsonb,
               updated_at = now()
          FROM unnest(p_ids, p_charge_ids, p_completions) WITH ORDINALITY
               AS x(id, charge_id, completion, pos)
         WHERE c.organization_id = p_org AND c.id = x.id AND c.status = 'charging'
        RETURNING x.pos)
    SELECT coalesce(array_agg(moved.pos::integer), '{}') INTO v_moved FROM moved;
    INSERT INTO journal_entries (organization_id, id, reference_type, reference_id, description,
                                 posted_at)
    SELECT p_org, e.id, 'checkout', p_ids[e.pos], e.description, p_at[e.pos]
      FROM unnest(p_entry_ids, p_entry_descriptions) WITH ORDINALITY AS e(id, description, pos)
     WHERE e.id IS NOT NULL AND e.pos = ANY (v_moved);
    INSERT INTO journal_lines (organization_id, entry_id, line_no, account, side, amount, currency)
    SELECT p_org, p_entry_ids[l.pos],
           (row_number() OVER (PARTITION BY l.pos ORDER BY l.k))::smallint,
           l.account, l.side, l.amount, l.currency
      FROM unnest(p_line_of, p_accounts, p_sides, p_amounts, p_currencies) WITH ORDINALITY
           AS l(pos, account, side, amount, currency, k)
     WHERE l.pos = ANY (v_moved);
    -- (every entry's balance: the deferred constraint triggers, at COMMIT)
    INSERT INTO tickets (organization_id, code, event_id, ticket_type_id, ticket_type,
                         checkout_id, issued_at)
    SELECT p_org, t.code, p_events[t.pos], t.type_id, t.type_code, p_ids[t.pos], p_at[t.pos]
      FROM unnest(p_ticket_of, p_codes, p_type_ids, p_type_codes) AS t(pos, code, type_id, type_code)
     WHERE t.pos = ANY (v_moved);
    UPDATE holds h SET state = 'consumed'
     WHERE h.organization_id = p_org AND h.state = 'active'
       AND h.checkout_id = ANY (SELECT p_ids[m] FROM unnest(v_moved) AS m);
    INSERT INTO outbox (event_id, organization_id, subject, payload)
    SELECT x.e, p_org, x.s, x.p
      FROM unnest(p_event_of, p_event_ids, p_subjects, p_payloads) AS x(pos, e, s, p)
     WHERE x.pos = ANY (v_moved);
    RETURN ARRAY(SELECT n = ANY (v_moved)
                   FROM generate_series(1, coalesce(array_length(p_ids, 1), 0)) AS n
                  ORDER BY n);
END $$;
