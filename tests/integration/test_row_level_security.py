"""Row-level security: a tenant-scoped transaction sees only its tenant, and the service role
cannot get around it."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from libs.actor import Actor, ActorType, Role
from libs.db import create_pool, platform_read_transaction, service_dsn, tenant_transaction
from libs.errors import Forbidden
from libs.migrations import SHARED_MIGRATIONS, load_migrations, migrate

PASSWORD = "test-role-password"

SAMPLE = """
CREATE TABLE sample_tickets (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_id uuid NOT NULL,
    code            text NOT NULL,
    UNIQUE (organization_id, code)
);
CREATE INDEX ON sample_tickets (organization_id);
SELECT vge.enable_tenant_rls('sample_tickets');
"""


@pytest.fixture
async def pool(admin_dsn: str, schema: str, tmp_path: Path):
    (tmp_path / "0001_sample.sql").write_text(SAMPLE)
    await migrate(admin_dsn, schema, tmp_path, role_password=PASSWORD)
    pool = await create_pool(service_dsn(admin_dsn, schema, PASSWORD), schema=schema)
    yield pool
    await pool.close()


A, B = uuid.uuid4(), uuid.uuid4()


async def _seed(pool: asyncpg.Pool) -> None:
    for org, codes in ((A, ["a1", "a2"]), (B, ["b1", "b2", "b3"])):
        async with tenant_transaction(pool, org) as conn:
            await conn.executemany(
                "INSERT INTO sample_tickets (organization_id, code) VALUES ($1, $2)",
                [(org, c) for c in codes],
            )


async def test_tenant_reads_only_its_rows_without_a_tenant_filter(pool):
    await _seed(pool)
    async with tenant_transaction(pool, A) as conn:
        rows = await conn.fetch("SELECT organization_id, code FROM sample_tickets ORDER BY code")
        assert [r["code"] for r in rows] == ["a1", "a2"]
        assert await conn.fetchval("SELECT count(*) FROM sample_tickets WHERE code LIKE 'b%'") == 0
        # writes into another tenant are refused too
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO sample_tickets (organization_id, code) VALUES ($1, 'sneaky')", B
            )
    async with tenant_transaction(pool, A) as conn:
        assert await conn.execute("UPDATE sample_tickets SET code = code || '!'") == "UPDATE 2"
        assert await conn.execute("DELETE FROM sample_tickets WHERE organization_id = $1", B) == "DELETE 0"
    async with tenant_transaction(pool, B) as conn:
        assert sorted(r["code"] for r in await conn.fetch("SELECT code FROM sample_tickets")) == ["b1", "b2", "b3"]


async def test_no_tenant_set_sees_nothing_and_setting_does_not_leak(pool):
    await _seed(pool)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sample_tickets") == 0
    # the tenant is transaction-local: the same pooled connection forgets it afterwards
    async with tenant_transaction(pool, A) as conn:
        assert await conn.fetchval("SELECT count(*) FROM sample_tickets") == 2
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sample_tickets") == 0


async def test_service_role_cannot_bypass_rls(pool, schema):
    await _seed(pool)
    attempts = [
        "SET row_security = off; SELECT count(*) FROM sample_tickets",
        "ALTER TABLE sample_tickets DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE sample_tickets NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY tenant_isolation ON sample_tickets",
        f"SET ROLE vge_{schema}_owner",
        "SET ROLE postgres",
        "CREATE POLICY open ON sample_tickets USING (true)",
        "ALTER ROLE CURRENT_USER BYPASSRLS",
    ]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user") is False
        for sql in attempts:
            with pytest.raises(asyncpg.PostgresError):
                async with conn.transaction():
                    await conn.execute(sql)
        # still isolated afterwards
        async with conn.transaction():
            await conn.execute("SELECT set_config('vge.org_id', $1, true)", str(A))
            assert await conn.fetchval("SELECT count(*) FROM sample_tickets") == 2


async def test_platform_read_is_for_platform_admins_and_read_only(pool):
    await _seed(pool)
    admin = Actor(user_id="p", organization_id=None, role=None, is_platform_admin=True, type=ActorType.USER)
    owner = Actor(user_id="o", organization_id=A, role=Role.OWNER, type=ActorType.USER)
    async with platform_read_transaction(pool, admin) as conn:
        assert await conn.fetchval("SELECT count(*) FROM sample_tickets") == 5
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("DELETE FROM sample_tickets")
    with pytest.raises(Forbidden):
        async with platform_read_transaction(pool, owner):
            pass


async def test_migrations_are_idempotent_concurrent_and_checked(admin_dsn, schema, tmp_path):
    import asyncio

    (tmp_path / "0001_sample.sql").write_text(SAMPLE)
    results = await asyncio.gather(
        *(migrate(admin_dsn, schema, tmp_path, role_password=PASSWORD) for _ in range(4))
    )
    applied = [v for r in results for v in r]
    shared = [m.version for m in load_migrations(SHARED_MIGRATIONS, "libs")]
    assert "libs:0001_outbox.sql" in shared
    assert sorted(applied) == sorted([*shared, f"{schema}:0001_sample.sql"])  # each once
    (tmp_path / "0001_sample.sql").write_text(SAMPLE + "\n-- edited\n")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        await migrate(admin_dsn, schema, tmp_path, role_password=PASSWORD)
