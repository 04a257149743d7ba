-- One round trip per saga step (design §6; the rules are unchanged, only the cost).
--
-- Why: a checkout used to cost ~27 database round trips (BEGIN, set the tenant, one statement
-- per change, COMMIT, the pool's reset...), and on two cores each round trip is a send, a
-- wake-up of a backend and a wake-up of the service. Each function below is ONE statement sent
-- in autocommit mode, so it is its own transaction: it sets the tenant transaction-locally
-- first (set_config(..., true), exactly what libs.db.tenant_transaction does), then every query
-- it runs is under row-level security as the calling role (SECURITY INVOKER: the service's
-- login role, which does not own these tables), and everything it writes, outbox rows
-- included, commits or rolls back together when the statement ends.
--
--   checkout_create   a pending checkout, its holds, its checkout.created event and the stock
--                     it takes (the popular type's row is locked last, until the commit that
--                     ends the statement)
--   checkout_open     take the saga lock, optionally claim the checkout for completion
--                     (pending -> charging: the intent is durable before the processor is
--                     called), and return the checkout as the saga sees it
--   checkout_finish   charging -> completed: record the charge, book the balanced sale, issue
--                     the tickets, consume the holds, queue the events; then let go of the
--                     saga lock
--   fake_processor_charge   the fake processor's idempotent charge, one statement

CREATE FUNCTION checkout_create(
    p_org uuid, p_id uuid, p_event uuid, p_email text, p_total bigint, p_currency text,
    p_expires timestamptz, p_create_key text,
    p_type_ids uuid[], p_codes text[], p_quantities integer[], p_prices bigint[],
    p_event_ids uuid[], p_subjects text[], p_payloads bytea[]
) RETURNS uuid  -- the earlier checkout's id if p_create_key was used before, else NULL
LANGUAGE plpgsql AS $$
DECLARE
    r       record;
    v_id    uuid;
    v_left  integer;
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    IF p_create_key IS NOT NULL THEN
        SELECT c.id INTO v_id FROM checkouts c
         WHERE c.organization_id = p_org AND c.create_key = p_create_key;
        IF FOUND THEN
            RETURN v_id;
        END IF;
    END IF;
    INSERT INTO checkouts (organization_id, id, event_id, customer_email, status, total,
                           currency, expires_at, create_key)
    VALUES (p_org, p_id, p_event, p_email, 'pending', p_total, p_currency, p_expires, p_create_key);
    INSERT INTO holds (organization_id, checkout_id, ticket_type_id, ticket_type, quantity,
                       unit_price, expires_at)
    SELECT p_org, p_id, t.id, t.code, t.qty, t.price, p_expires
      FROM unnest(p_type_ids, p_codes, p_quantities, p_prices) AS t(id, code, qty, price);
    INSERT INTO outbox (event_id, organization_id, subject, payload)
    SELECT x.e, p_org, x.s, x.p FROM unnest(p_event_ids, p_subjects, p_payloads) AS x(e, s, p);
    -- Last, in type-id order (two multi-type checkouts cannot deadlock): one conditional update
    -- per type. The row lock serialises buyers of a type on every replica, the condition
    -- re-checks the stock under it, never_oversold backs it up. The caller priced the checkout
    -- from its cache of the (immutable) ticket types: the price, currency, code and event are
    -- checked here too, so a stale cache can never book a wrong total.
    FOR r IN SELECT * FROM unnest(p_type_ids, p_codes, p_quantities, p_prices)
                 AS t(id, code, qty, price) ORDER BY t.id LOOP
        UPDATE ticket_types tt SET reserved = tt.reserved + r.qty
         WHERE tt.organization_id = p_org AND tt.id = r.id AND tt.event_id = p_event
           AND tt.code = r.code AND tt.price = r.price AND tt.currency = p_currency
           AND tt.reserved + r.qty <= tt.quantity;
        IF NOT FOUND THEN
            SELECT tt.quantity - tt.reserved INTO v_left FROM ticket_types tt
             WHERE tt.organization_id = p_org AND tt.id = r.id AND tt.event_id = p_event
               AND tt.code = r.code AND tt.price = r.price AND tt.currency = p_currency;
            IF FOUND THEN
                RAISE EXCEPTION 'vge_sold_out' USING DETAIL = r.code, HINT = greatest(v_left, 0)::text;
            END IF;
            RAISE EXCEPTION 'vge_catalog_changed' USING DETAIL = r.code;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE FUNCTION checkout_open(
    p_org uuid, p_id uuid, p_lock_key text,
    p_claim_key text DEFAULT NULL, p_actor jsonb DEFAULT NULL, p_correlation text DEFAULT NULL,
    p_causation text DEFAULT NULL
) RETURNS TABLE (
    locked boolean, claimed boolean,
    organization_id uuid, id uuid, event_id uuid, status text, total bigint, currency text,
    expires_at timestamptz, completion_key text, charge_id text, refund_id text,
    failure_reason text, completion jsonb, refund jsonb, actor jsonb, correlation_id text,
    causation_id text, items json
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_locked    boolean;
    v_claimed   boolean := false;
    v_claimable boolean;
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    -- By primary key only: with the expiry in the condition the planner may walk the index
    -- of pending checkouts instead (fine while few are pending, not with many). The expiry
    -- never changes and now() is this transaction's, so checking it here is the same check.
    SELECT c.status = 'pending' AND c.completion_key IS NULL AND c.expires_at > now()
      INTO v_claimable
      FROM checkouts c WHERE c.organization_id = p_org AND c.id = p_id;
    IF NOT FOUND THEN  -- no row (another tenant's or none): no lock is taken
        RETURN;
    END IF;
    -- the saga lock is a session lock: it outlives this statement's transaction and goes when
    -- checkout_finish (or the caller) lets go of it, or with the connection (a crash)
    v_locked := pg_try_advisory_lock(hashtextextended(p_lock_key, 0));
    IF v_locked AND v_claimable AND p_claim_key IS NOT NULL THEN
        -- pending -> charging, if the holds have not lapsed (database clock); conditional,
        -- so that nothing but a pending checkout is ever claimed (the expiry sweep locks the
        -- row and moves it to 'expired': then this finds nothing)
        UPDATE checkouts c
           SET status = 'charging', completion_key = p_claim_key, actor = p_actor,
               correlation_id = p_correlation, causation_id = p_causation, updated_at = now()
         WHERE c.organization_id = p_org AND c.id = p_id AND c.status = 'pending'
           AND c.completion_key IS NULL;
        v_claimed := FOUND;
    END IF;
    RETURN QUERY
    SELECT v_locked, v_claimed,
           c.organization_id, c.id, c.event_id, c.status, c.total, c.currency, c.expires_at,
           c.completion_key, c.charge_id, c.refund_id, c.failure_reason, c.completion, c.refund,
           c.actor, c.correlation_id, c.causation_id,
           (SELECT coalesce(json_agg(json_build_object(
                       'ticket_type_id', h.ticket_type_id, 'ticket_type', h.ticket_type,
                       'quantity', h.quantity, 'unit_price', h.unit_price, 'state', h.state)
                       ORDER BY h.ticket_type), '[]'::json)
              FROM holds h
             WHERE h.organization_id = c.organization_id AND h.checkout_id = c.id)
      FROM checkouts c
     WHERE c.organization_id = p_org AND c.id = p_id;
END $$;

CREATE FUNCTION checkout_finish(
    p_org uuid, p_id uuid, p_from text, p_charge_id text, p_completion jsonb,
    p_event uuid, p_issued_at timestamptz,
    p_codes text[], p_type_ids uuid[], p_type_codes text[],
    p_entry_id uuid, p_entry_description text, p_posted_at timestamptz,
    p_accounts text[], p_sides text[], p_amounts bigint[], p_currencies text[],
    p_event_ids uuid[], p_subjects text[], p_payloads bytea[],
    p_unlock_key text
) RETURNS boolean  -- false: the checkout was no longer in p_from (nothing written)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    UPDATE checkouts c
       SET status = 'completed', charge_id = p_charge_id, completion = p_completion,
           updated_at = now()
     WHERE c.organization_id = p_org AND c.id = p_id AND c.status = p_from;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_entry_id IS NOT NULL THEN  -- a free checkout books nothing
        INSERT INTO journal_entries (organization_id, id, reference_type, reference_id,
                                     description, posted_at)
        VALUES (p_org, p_entry_id, 'checkout', p_id, p_entry_description, p_posted_at);
        INSERT INTO journal_lines (organization_id, entry_id, line_no, account, side, amount, currency)
        SELECT p_org, p_entry_id, l.n::smallint, l.account, l.side, l.amount, l.currency
          FROM unnest(p_accounts, p_sides, p_amounts, p_currencies)
               WITH ORDINALITY AS l(account, side, amount, currency, n);
        -- The deferred constraint triggers check the balance again at COMMIT (that stays the
        -- rule); checking now as well means the saga lock below is only let go of for a sale
        -- that is going to commit.
        PERFORM journal_entry_check(p_org, p_entry_id);
    END IF;
    INSERT INTO tickets (organization_id, code, event_id, ticket_type_id, ticket_type,
                         checkout_id, issued_at)
    SELECT p_org, t.code, p_event, t.type_id, t.type_code, p_id, p_issued_at
      FROM unnest(p_codes, p_type_ids, p_type_codes) AS t(code, type_id, type_code);
    -- the holds become sales; the stock counter already counts them
    UPDATE holds h SET state = 'consumed'
     WHERE h.organization_id = p_org AND h.checkout_id = p_id AND h.state = 'active';
    INSERT INTO outbox (event_id, organization_id, subject, payload)
    SELECT x.e, p_org, x.s, x.p FROM unnest(p_event_ids, p_subjects, p_payloads) AS x(e, s, p);
    IF p_unlock_key IS NOT NULL THEN
        -- Session locks are not transactional: this takes effect now, a moment before the
        -- COMMIT. Safe: whoever takes the lock in that moment still sees 'charging', finds the
        -- same charge by its key, and its own conditional update then finds 'completed'.
        PERFORM pg_advisory_unlock(hashtextextended(p_unlock_key, 0));
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION fake_processor_charge(
    p_org uuid, p_id text, p_key text, p_amount bigint, p_currency text, p_token text
) RETURNS TABLE (id text, amount bigint, currency text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    RETURN QUERY
    INSERT INTO fake_processor_charges AS c
           (organization_id, id, idempotency_key, amount, currency, token)
    VALUES (p_org, p_id, p_key, p_amount, p_currency, p_token)
    ON CONFLICT (organization_id, idempotency_key) DO NOTHING
    RETURNING c.id, c.amount, c.currency;
    IF NOT FOUND THEN  -- a repeat: the first charge stands
        RETURN QUERY
        SELECT c.id, c.amount, c.currency FROM fake_processor_charges c
         WHERE c.organization_id = p_org AND c.idempotency_key = p_key;
    END IF;
END $$;
