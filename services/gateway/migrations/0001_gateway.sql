-- Gateway: organizations (tenants), API keys, gate devices and their enrolments, and the
-- responses kept for Idempotency-Key replays. Every table is a tenant table with row-level
-- security; a credential's token names its tenant, so a lookup is a tenant-scoped read like any
-- other and no code path reads across tenants. Secrets are stored only as sha256 digests: they
-- are 256-bit random values, so a slow password hash would add latency and no safety.

CREATE TABLE organizations (
    organization_id uuid        PRIMARY KEY,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at      timestamptz NOT NULL DEFAULT now()
);
SELECT vge.enable_tenant_rls('organizations');

CREATE TABLE api_keys (
    organization_id uuid        NOT NULL REFERENCES organizations,
    id              uuid        NOT NULL,
    name            text        NOT NULL,
    -- NULL: an integration key with the policy's fixed API-key reach; else the role it acts with
    role            text        CHECK (role IN ('owner', 'admin', 'staff', 'viewer', 'scanner_only')),
    secret_hash     bytea       NOT NULL,
    created_by      text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    PRIMARY KEY (organization_id, id)
);
SELECT vge.enable_tenant_rls('api_keys');

CREATE TABLE devices (
    organization_id uuid        NOT NULL REFERENCES organizations,
    id              uuid        NOT NULL,
    name            text        NOT NULL,
    event_id        uuid,       -- bound to one event: scans for any other are device_not_allowed
    gate            text,       -- default gate of its scans
    token_hash      bytea,      -- NULL until enrolled; replaced when the token is rolled
    enrolled_at     timestamptz,
    token_rolled_at timestamptz,
    revoked_at      timestamptz,
    created_by      text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id)
);
SELECT vge.enable_tenant_rls('devices');

CREATE TABLE device_enrolments (
    organization_id uuid        NOT NULL,
    id              uuid        NOT NULL,
    device_id       uuid        NOT NULL,
    secret_hash     bytea       NOT NULL,
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    FOREIGN KEY (organization_id, device_id) REFERENCES devices
);
SELECT vge.enable_tenant_rls('device_enrolments');

-- One row per (credential, Idempotency-Key): claimed before the work, completed with the
-- response after it. A second request with the key replays the stored response.
CREATE TABLE idempotency_records (
    organization_id uuid        NOT NULL,
    credential_id   text        NOT NULL,
    key             text        NOT NULL,
    request_hash    text        NOT NULL,
    status_code     integer,
    body            jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    PRIMARY KEY (organization_id, credential_id, key)
);
SELECT vge.enable_tenant_rls('idempotency_records');
