-- The fake processor's charge commits without waiting for its WAL flush (synchronous_commit
-- off for that one transaction). It stands for a remote party whose durability is its own; what
-- it costs here is one more fsync wait in the middle of every checkout, which a real provider's
-- HTTP call does not put on our database. Nothing is lost that matters: WAL is one sequence, so
-- the saga's next durable commit (the sale, or the compensation) makes the charge durable too;
-- and a database crash before that leaves a saga in 'charging' (its intent was committed
-- synchronously before the charge) that the resumer settles by looking the charge up, finding
-- none, and ending it as 'interrupted': no tickets, no money, as a lost charge should.
CREATE OR REPLACE FUNCTION fake_processor_charge(
    p_org uuid, p_id text, p_key text, p_amount bigint, p_currency text, p_token text
) RETURNS TABLE (id text, amount bigint, currency text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('vge.org_id', p_org::text, true);
    PERFORM set_config('synchronous_commit', 'off', true);
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
