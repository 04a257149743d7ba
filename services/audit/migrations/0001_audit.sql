-- The audit log (design §4.3): one record per event, hash-chained per tenant.
-- Runs as vge_audit_owner; the service logs in as vge_audit, which may append records but never
-- change or remove one, so only an administrator's raw SQL can tamper, and verify sees it.

CREATE TABLE chain_heads (
    organization_id uuid        PRIMARY KEY,
    last_seq        bigint      NOT NULL CHECK (last_seq >= 0),
    last_hash       text        NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
SELECT vge.enable_tenant_rls('chain_heads');

CREATE TABLE records (
    organization_id         uuid        NOT NULL,
    seq                     bigint      NOT NULL CHECK (seq > 0),
    event_id                uuid        NOT NULL UNIQUE,  -- a redelivered event is recorded once
    action                  text        NOT NULL,
    resource_type           text        NOT NULL,
    resource_id             text,
    actor_user_id           text        NOT NULL,
    actor_organization_id   uuid,
    actor_role              text,
    actor_is_platform_admin boolean     NOT NULL,
    actor_is_platform_staff boolean     NOT NULL,
    actor_type              text        NOT NULL,
    -- json, not jsonb: stored as written (the canonical JSON the hash covers); jsonb would
    -- respell numbers and refuse \u0000, and the hash could no longer be recomputed.
    change                  json        NOT NULL,
    correlation_id          text        NOT NULL,
    causation_id            text,
    occurred_at             timestamptz NOT NULL,
    recorded_at             timestamptz NOT NULL,
    prev_hash               text        NOT NULL,
    hash                    text        NOT NULL,
    PRIMARY KEY (organization_id, seq)  -- one chain per tenant, one record per position
);
-- the query filters (design §7: GET /v1/audit); each within the tenant, in chain order
CREATE INDEX records_resource ON records (organization_id, resource_type, resource_id, seq);
CREATE INDEX records_actor ON records (organization_id, actor_user_id, seq);
CREATE INDEX records_action ON records (organization_id, action, seq);
CREATE INDEX records_correlation ON records (organization_id, correlation_id);
CREATE INDEX records_occurred ON records (organization_id, occurred_at);
SELECT vge.enable_tenant_rls('records');

-- Append-only for the service: the default privileges granted UPDATE and DELETE; take them back.
-- The login role is vge_<schema> (libs.db.service_role), i.e. vge_audit.
DO $$
BEGIN
    EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON records FROM %I', 'vge_' || current_schema());
    EXECUTE format('REVOKE DELETE, TRUNCATE ON chain_heads FROM %I', 'vge_' || current_schema());
END $$;
