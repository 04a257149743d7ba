-- Scanning's own state: the ticket registry (a read model of payments' events), every scan,
-- occupancy. Every tenant table has row-level security (vge.enable_tenant_rls).

CREATE TABLE events (
    organization_id uuid        NOT NULL,
    event_id        uuid        NOT NULL,
    name            text        NOT NULL,
    capacity        int,
    reentry_allowed boolean     NOT NULL DEFAULT false,
    valid_from      timestamptz,
    valid_until     timestamptz,
    zones           text[]      NOT NULL DEFAULT '{}',
    PRIMARY KEY (organization_id, event_id)
);
SELECT vge.enable_tenant_rls('events');

CREATE TABLE ticket_types (
    organization_id uuid   NOT NULL,
    event_id        uuid   NOT NULL,
    code            text   NOT NULL,
    name            text   NOT NULL,
    zones           text[] NOT NULL DEFAULT '{}',  -- empty: every zone
    PRIMARY KEY (organization_id, event_id, code)
);
SELECT vge.enable_tenant_rls('ticket_types');

-- One row per ticket: outside -> inside -> outside. Ticket codes are unique per tenant
-- (and unguessable), so a constraint error can never reveal another tenant's code.
CREATE TABLE tickets (
    organization_id    uuid        NOT NULL,
    ticket_code        text        NOT NULL,
    event_id           uuid        NOT NULL,
    ticket_type        text        NOT NULL,
    status             text        NOT NULL DEFAULT 'valid' CHECK (status IN ('valid', 'cancelled')),
    inside             boolean     NOT NULL DEFAULT false,
    entries            int         NOT NULL DEFAULT 0,
    exits              int         NOT NULL DEFAULT 0,
    first_admitted_at  timestamptz,
    first_gate         text,
    last_entry_at      timestamptz,
    last_entry_scan_id uuid,
    issued_at          timestamptz,
    cancelled_at       timestamptz,
    PRIMARY KEY (organization_id, ticket_code)
);
SELECT vge.enable_tenant_rls('tickets');

-- Every scan, accepted or rejected, with the device's and the server's time.
CREATE TABLE scans (
    scan_id           uuid        PRIMARY KEY,
    organization_id   uuid        NOT NULL,
    event_id          uuid        NOT NULL,
    ticket_code       text        NOT NULL,
    ticket_type       text,
    direction         text        NOT NULL CHECK (direction IN ('entry', 'exit')),
    gate              text,
    zone              text,
    device_id         text        NOT NULL,
    nonce             text        NOT NULL,
    result            text        NOT NULL CHECK (result IN ('accepted', 'rejected')),
    reason            text,
    conflict          boolean     NOT NULL DEFAULT false,
    offline           boolean     NOT NULL DEFAULT false,
    first_admitted_at timestamptz,
    first_gate        text,
    -- n-th admission of the ticket, for accepted entries: the backstop against a double
    -- admission that the conditional update on tickets already prevents
    admission_no      int,
    scanned_at        timestamptz,           -- the device's clock
    received_at       timestamptz NOT NULL,  -- the server's clock
    UNIQUE (organization_id, device_id, nonce),
    UNIQUE (organization_id, ticket_code, admission_no)
);
CREATE INDEX scans_ticket ON scans (organization_id, ticket_code);
SELECT vge.enable_tenant_rls('scans');

CREATE TABLE occupancy (
    organization_id   uuid        NOT NULL,
    event_id          uuid        NOT NULL,
    inside            int         NOT NULL DEFAULT 0,
    entries           int         NOT NULL DEFAULT 0,
    exits             int         NOT NULL DEFAULT 0,
    version           bigint      NOT NULL DEFAULT 0,
    published_version bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz,
    PRIMARY KEY (organization_id, event_id)
);
SELECT vge.enable_tenant_rls('occupancy');

CREATE TABLE occupancy_counts (
    organization_id uuid NOT NULL,
    event_id        uuid NOT NULL,
    dimension       text NOT NULL CHECK (dimension IN ('gate', 'ticket_type')),
    key             text NOT NULL,
    entries         int  NOT NULL DEFAULT 0,
    exits           int  NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, event_id, dimension, key)
);
SELECT vge.enable_tenant_rls('occupancy_counts');

-- Infrastructure, not tenant data (like the outbox): which events' occupancy changed since the
-- last occupancy.changed, so the publisher coalesces many scans into one event.
CREATE TABLE occupancy_dirty (
    organization_id uuid NOT NULL,
    event_id        uuid NOT NULL,
    PRIMARY KEY (organization_id, event_id)
);
