-- Payments: catalog, inventory holds, checkouts (the saga's state), tickets, the ledger, and
-- the fake payment processor's own records. Every table is a tenant table with row-level
-- security; every primary key starts with organization_id so foreign keys can never cross
-- tenants and RLS lookups use the primary key index.

-- ---------------------------------------------------------------------------------------------
-- Catalog and inventory
-- ---------------------------------------------------------------------------------------------

CREATE TABLE events (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL,
    name            text        NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    valid_from      timestamptz,
    valid_until     timestamptz,
    capacity        integer     NOT NULL CHECK (capacity >= 0),
    reentry_allowed boolean     NOT NULL DEFAULT false,
    zones           text[]      NOT NULL DEFAULT '{}',
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, idempotency_key),
    CHECK (ends_at > starts_at)
);
SELECT vge.enable_tenant_rls('events');

CREATE TABLE ticket_types (
    organization_id uuid    NOT NULL,
    id              uuid    NOT NULL,
    event_id        uuid    NOT NULL,
    code            text    NOT NULL,
    name            text    NOT NULL,
    price           bigint  NOT NULL CHECK (price >= 0),
    currency        text NOT NULL,
    quantity        integer NOT NULL CHECK (quantity >= 0),
    -- held + sold, the one counter a sale touches: a hold adds to it, a lapsed or failed hold
    -- and a refund take from it, and turning a hold into a sale changes nothing. So a popular
    -- type's row is locked once per sale (the held/sold split is in holds and tickets).
    reserved        integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    zones           text[]  NOT NULL DEFAULT '{}',
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, event_id, code),
    FOREIGN KEY (organization_id, event_id) REFERENCES events,
    -- The last line of defence against overselling: whatever the code does, the database
    -- refuses a row with more tickets held or sold than exist.
    CONSTRAINT never_oversold CHECK (reserved <= quantity)
);
SELECT vge.enable_tenant_rls('ticket_types');

-- ---------------------------------------------------------------------------------------------
-- Checkouts (one row per checkout is the saga's persisted state) and their holds
-- ---------------------------------------------------------------------------------------------

CREATE TABLE checkouts (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL,
    event_id        uuid        NOT NULL,
    customer_email  text        NOT NULL,
    status          text        NOT NULL CHECK (status IN (
                        'pending', 'charging', 'charged', 'posted', 'completed',
                        'compensating', 'failed', 'expired', 'refunding', 'refunded')),
    total           bigint      NOT NULL CHECK (total >= 0),
    currency        text     NOT NULL,
    expires_at      timestamptz NOT NULL,
    create_key      text,            -- Idempotency-Key of the create command, if any
    completion_key  text,            -- Idempotency-Key of the (first) complete command
    charge_id       text,
    refund_id       text,
    failure_reason  text CHECK (failure_reason IN (
                        'declined', 'processor_timeout', 'processing_failed', 'interrupted')),
    completion      jsonb,           -- the first completion reply, returned to every retry
    refund          jsonb,           -- the refund reply, likewise
    actor           jsonb,           -- who completed/refunds it: events of resumed steps carry it
    correlation_id  text,
    causation_id    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    FOREIGN KEY (organization_id, event_id) REFERENCES events,
    UNIQUE (organization_id, create_key),
    UNIQUE (organization_id, completion_key)
);
SELECT vge.enable_tenant_rls('checkouts');
-- what the expiry sweep and the saga resumer look for
CREATE INDEX checkouts_pending_expiry ON checkouts (expires_at) WHERE status = 'pending';
CREATE INDEX checkouts_unfinished ON checkouts (updated_at)
    WHERE status IN ('charging', 'charged', 'posted', 'compensating', 'refunding');

CREATE TABLE holds (
    organization_id uuid    NOT NULL,
    checkout_id     uuid    NOT NULL,
    ticket_type_id  uuid    NOT NULL,
    ticket_type     text    NOT NULL,   -- the type's code, as the buyer named it
    quantity        integer NOT NULL CHECK (quantity > 0),
    unit_price      bigint  NOT NULL CHECK (unit_price >= 0),
    expires_at      timestamptz NOT NULL,
    state           text    NOT NULL DEFAULT 'active'
                            CHECK (state IN ('active', 'consumed', 'released')),
    PRIMARY KEY (organization_id, checkout_id, ticket_type_id),
    FOREIGN KEY (organization_id, checkout_id) REFERENCES checkouts,
    FOREIGN KEY (organization_id, ticket_type_id) REFERENCES ticket_types
);
SELECT vge.enable_tenant_rls('holds');

-- ---------------------------------------------------------------------------------------------
-- Tickets
-- ---------------------------------------------------------------------------------------------

CREATE TABLE tickets (
    organization_id uuid        NOT NULL,
    code            text        NOT NULL,   -- 128 random bits; unique per tenant (see notes)
    event_id        uuid        NOT NULL,
    ticket_type_id  uuid        NOT NULL,
    ticket_type     text        NOT NULL,
    checkout_id     uuid        NOT NULL,
    status          text        NOT NULL DEFAULT 'issued' CHECK (status IN ('issued', 'cancelled')),
    issued_at       timestamptz NOT NULL DEFAULT now(),
    cancelled_at    timestamptz,
    PRIMARY KEY (organization_id, code),
    FOREIGN KEY (organization_id, checkout_id) REFERENCES checkouts,
    FOREIGN KEY (organization_id, ticket_type_id) REFERENCES ticket_types
);
SELECT vge.enable_tenant_rls('tickets');
CREATE INDEX tickets_by_checkout ON tickets (organization_id, checkout_id);

-- ---------------------------------------------------------------------------------------------
-- Ledger: accounts, immutable balanced journal entries
-- ---------------------------------------------------------------------------------------------

CREATE TABLE accounts (
    organization_id uuid NOT NULL,
    code            text NOT NULL,
    name            text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('asset', 'liability', 'revenue', 'expense', 'equity')),
    PRIMARY KEY (organization_id, code)
);
SELECT vge.enable_tenant_rls('accounts');

CREATE TABLE journal_entries (
    organization_id   uuid        NOT NULL,
    id                uuid        NOT NULL,
    reference_type    text        NOT NULL CHECK (reference_type IN ('checkout', 'refund', 'compensation')),
    reference_id      uuid        NOT NULL,
    reverses_entry_id uuid,
    description       text        NOT NULL,
    posted_at         timestamptz NOT NULL DEFAULT now(),
    -- lines may be added only in the transaction that created the entry (see below)
    posted_txid       xid8        NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (organization_id, id),
    -- one sale, one refund and one compensation per checkout at most: a retried step can
    -- never book twice
    UNIQUE (organization_id, reference_type, reference_id),
    -- an entry is reversed at most once
    UNIQUE (organization_id, reverses_entry_id),
    FOREIGN KEY (organization_id, reverses_entry_id) REFERENCES journal_entries
);
SELECT vge.enable_tenant_rls('journal_entries');

CREATE TABLE journal_lines (
    organization_id uuid     NOT NULL,
    entry_id        uuid     NOT NULL,
    line_no         smallint NOT NULL,
    account         text     NOT NULL,
    side            text     NOT NULL CHECK (side IN ('debit', 'credit')),
    amount          bigint   NOT NULL CHECK (amount > 0),
    currency        text  NOT NULL,
    PRIMARY KEY (organization_id, entry_id, line_no),
    FOREIGN KEY (organization_id, entry_id) REFERENCES journal_entries,
    FOREIGN KEY (organization_id, account) REFERENCES accounts
);
SELECT vge.enable_tenant_rls('journal_lines');
CREATE INDEX journal_lines_by_account ON journal_lines (organization_id, account, currency);

-- Every entry balances per currency and has at least two lines, checked at COMMIT (deferred),
-- when all of its lines are in. Fired for every new entry and for every new line, so neither a
-- lone entry nor lines added after SET CONSTRAINTS ... IMMEDIATE escape the check.
CREATE FUNCTION journal_entry_check(org uuid, entry uuid) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    n_lines integer;
    bad record;
BEGIN
    SELECT count(*) INTO n_lines FROM journal_lines
     WHERE organization_id = org AND entry_id = entry;
    IF n_lines < 2 THEN
        RAISE EXCEPTION 'journal entry % has % line(s); an entry needs at least two', entry, n_lines
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT currency,
           sum(amount) FILTER (WHERE side = 'debit')  AS debit,
           sum(amount) FILTER (WHERE side = 'credit') AS credit
      INTO bad
      FROM journal_lines
     WHERE organization_id = org AND entry_id = entry
     GROUP BY currency
    HAVING coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0)
        <> coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry % does not balance in %: debit % <> credit %',
            entry, bad.currency, coalesce(bad.debit, 0), coalesce(bad.credit, 0)
            USING ERRCODE = 'check_violation';
    END IF;
END $$;

CREATE FUNCTION journal_entry_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'journal_entries' THEN
        PERFORM journal_entry_check(NEW.organization_id, NEW.id);
    ELSE
        PERFORM journal_entry_check(NEW.organization_id, NEW.entry_id);
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER journal_entry_balanced AFTER INSERT ON journal_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION journal_entry_balanced();
CREATE CONSTRAINT TRIGGER journal_line_balanced AFTER INSERT ON journal_lines
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION journal_entry_balanced();

-- A posted entry is closed: lines go only into an entry created in the same transaction.
CREATE FUNCTION journal_line_into_open_entry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM journal_entries
         WHERE organization_id = NEW.organization_id AND id = NEW.entry_id
           AND posted_txid = pg_current_xact_id()
    ) THEN
        RAISE EXCEPTION 'journal entry % is already posted; post a reversing entry instead',
            NEW.entry_id USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER journal_line_into_open_entry BEFORE INSERT ON journal_lines
    FOR EACH ROW EXECUTE FUNCTION journal_line_into_open_entry();

-- Entries are immutable, for everyone (also the owner and superusers, whose privileges the
-- REVOKE below does not touch): corrections are reversing entries.
CREATE FUNCTION journal_is_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % refused: journal entries are immutable; post a reversing entry',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER journal_entries_immutable BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION journal_is_immutable();
CREATE TRIGGER journal_lines_immutable BEFORE UPDATE OR DELETE ON journal_lines
    FOR EACH ROW EXECUTE FUNCTION journal_is_immutable();
CREATE TRIGGER journal_entries_no_truncate BEFORE TRUNCATE ON journal_entries
    FOR EACH STATEMENT EXECUTE FUNCTION journal_is_immutable();
CREATE TRIGGER journal_lines_no_truncate BEFORE TRUNCATE ON journal_lines
    FOR EACH STATEMENT EXECUTE FUNCTION journal_is_immutable();
-- and the service's login role (vge_<schema>, i.e. vge_payments) may not even try
DO $$ BEGIN
    EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON journal_entries, journal_lines FROM %I',
                   'vge_' || current_schema());
END $$;

-- ---------------------------------------------------------------------------------------------
-- The fake payment processor's own books (local runs and tests only; a real provider keeps
-- these). Tenant-scoped like everything else: the tenant is the processor's "merchant".
-- ---------------------------------------------------------------------------------------------

CREATE TABLE fake_processor_charges (
    organization_id uuid        NOT NULL,
    id              text        NOT NULL,
    idempotency_key text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount > 0),
    currency        text     NOT NULL,
    token           text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, idempotency_key)
);
SELECT vge.enable_tenant_rls('fake_processor_charges');

CREATE TABLE fake_processor_refunds (
    organization_id uuid        NOT NULL,
    id              text        NOT NULL,
    charge_id       text        NOT NULL,
    amount          bigint      NOT NULL CHECK (amount > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, charge_id),   -- whole refunds only: at most one per charge
    FOREIGN KEY (organization_id, charge_id) REFERENCES fake_processor_charges
);
SELECT vge.enable_tenant_rls('fake_processor_refunds');
