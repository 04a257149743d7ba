-- The relay keeps one position per outbox instead of marking each row it published.
--
-- Why: marking meant an UPDATE of every published row: a new row version plus an entry in each
-- index (published_at was in the partial index's predicate, so no update was HOT), i.e. the
-- outbox written twice per event. bench/bench_scan.py, 3 pairs against the row marks: PostgreSQL
-- CPU per scan flat out 128-134 us against 145-173; p99 at 1,000 scans/s 10.3-11.9 ms against
-- 12.5-13.4; the 10,000-scan offline batch 0.78-0.82 s against 0.86-1.15.
--
-- A row is published when (txid, id) is at or behind the relay's position. txid is the id of
-- the transaction that wrote the row; the relay only reads rows whose transaction ended before
-- its snapshot began (txid < the snapshot's xmin), in (txid, id) order, so a transaction that
-- commits late can never be skipped: its rows come before every row the relay has not read yet.
-- The price: a transaction that holds a transaction id open (an idle psql session that wrote)
-- holds back every later event until it ends; the relay logs a warning when that lasts.
ALTER TABLE outbox ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX outbox_relay_order ON outbox (txid, id);

CREATE TABLE outbox_relay (
    only_one   boolean PRIMARY KEY DEFAULT true CHECK (only_one),
    txid       xid8        NOT NULL,
    id         bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Every row written so far has this transaction's id: start just before the first unpublished
-- one (the published rows after it come again; JetStream's duplicate window and the consumers'
-- tracking records drop them), or after the last row when all were published.
INSERT INTO outbox_relay (txid, id)
SELECT pg_current_xact_id(),
       coalesce((SELECT min(id) - 1 FROM outbox WHERE published_at IS NULL), (SELECT max(id) FROM outbox), 0);

DROP INDEX outbox_unpublished;
ALTER TABLE outbox DROP COLUMN published_at;

-- What the relay has not published yet (operators, tests, benches).
CREATE VIEW outbox_unpublished AS
SELECT o.* FROM outbox_relay r, LATERAL (SELECT * FROM outbox o WHERE (o.txid, o.id) > (r.txid, r.id)) o;
