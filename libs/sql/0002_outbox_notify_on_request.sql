-- The outbox notifies its relay at commit only when the writing transaction asks for it
-- (SET LOCAL vge.outbox_notify = 'on', done by libs.outbox.add_events): a writer whose process
-- runs no relay of this schema (a CLI). Every other writer wakes its own process's relay right
-- after its commit.
--
-- Why: a transaction that NOTIFYs takes a database-wide lock at commit and holds it through its
-- WAL flush, so concurrent notifying commits (checkouts, credential changes, audit appends)
-- flushed one after the other instead of together, and each notification woke the listening
-- backend and the service's event loop once more. Scanning measured it first and dropped its
-- trigger (scanning 0004); this makes it the rule for every schema.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('vge.outbox_notify', true) = 'on' THEN
        PERFORM pg_notify('vge_outbox_' || TG_TABLE_SCHEMA, '');
    END IF;
    RETURN NULL;
END $$;
