-- Shared, service-independent database objects. Run by the migration runner as admin,
-- idempotently, under the migrations advisory lock.
CREATE SCHEMA IF NOT EXISTS vge;
GRANT USAGE ON SCHEMA vge TO PUBLIC;

-- The tenant of the current transaction (set by libs.db.tenant_transaction with SET LOCAL).
-- NULL when unset, so an unscoped query matches no tenant row instead of failing open.
CREATE OR REPLACE FUNCTION vge.current_org_id() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting('vge.org_id', true), '')::uuid $$;

-- True inside libs.db.platform_read_transaction (platform admins, read-only, audited).
CREATE OR REPLACE FUNCTION vge.platform_read() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce(current_setting('vge.platform_read', true), '') = 'on' $$;

-- Every tenant table calls this once in its migration: RLS enabled AND forced (owners too),
-- tenant rows only, plus read-only access inside a platform read.
CREATE OR REPLACE FUNCTION vge.enable_tenant_rls(tbl regclass) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %s', tbl);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s USING (organization_id = vge.current_org_id()) '
        'WITH CHECK (organization_id = vge.current_org_id())', tbl);
    EXECUTE format('DROP POLICY IF EXISTS platform_read ON %s', tbl);
    EXECUTE format('CREATE POLICY platform_read ON %s FOR SELECT USING (vge.platform_read())', tbl);
END $$;
