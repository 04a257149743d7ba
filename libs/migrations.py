"""Per-service SQL migrations for asyncpg.

Why not a library: yoyo and alembic drive sync drivers (psycopg / SQLAlchemy) and would add a
second PostgreSQL driver next to asyncpg; what we need is small: ordered ``NNNN_name.sql``
files, each applied once in its own transaction, recorded with a checksum, serialised across
replicas by an advisory lock. This module is that and nothing more.

Layout per service (design §4.1): schema ``<service>`` owned by the NOLOGIN role
``vge_<service>_owner`` (migrations run as it), and a LOGIN role ``vge_<service>`` that gets DML
only: it does not own its tables, so FORCE'd row-level security applies to it and it cannot
disable it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from libs.db import check_identifier, service_role
from libs.log import get_logger

__all__ = ["migrate", "Migration", "load_migrations", "SHARED_MIGRATIONS"]

log = get_logger(__name__)

SHARED_MIGRATIONS = Path(__file__).parent / "sql"
_BOOTSTRAP = SHARED_MIGRATIONS / "vge_bootstrap.sql"
_LOCK_KEY = 0x56474500  # 'VGE\0': one lock for every service's migrations


@dataclass(frozen=True)
class Migration:
    """One SQL file, identified as ``<source>:<file name>``."""

    version: str
    sql: str

    @property
    def checksum(self) -> str:
        """sha256 of the SQL, so an edited applied migration is noticed, not ignored."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path, source: str) -> list[Migration]:
    """The ``*.sql`` files of ``directory`` in name order (``0001_...``, ``0002_...``)."""
    return [
        Migration(f"{source}:{p.name}", p.read_text())
        for p in sorted(directory.glob("[0-9]*.sql"))
    ]


async def migrate(
    admin_dsn: str, schema: str, migrations_dir: Path | None, *, role_password: str
) -> list[str]:
    """Bring ``schema`` up to date; returns the versions applied now.

    Safe to run from several replicas at once: the advisory lock makes the others wait and
    then find nothing to do.
    """
    check_identifier(schema)
    owner, login = f"vge_{schema}_owner", service_role(schema)
    migrations = load_migrations(SHARED_MIGRATIONS, "libs")
    if migrations_dir is not None:
        migrations += load_migrations(migrations_dir, schema)

    conn = await asyncpg.connect(admin_dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_BOOTSTRAP.read_text())
            await _ensure_roles(conn, schema, owner, login, role_password)
            done = {
                r["version"]: r["checksum"]
                for r in await conn.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
            }
            for m in migrations:
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise RuntimeError(
                            f"migration {m.version} changed after it was applied; "
                            "add a new migration instead of editing an old one"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL ROLE {owner}")
                    await conn.execute(f"SET LOCAL search_path = {schema}, vge")
                    await conn.execute(m.sql)
                    await conn.execute("RESET ROLE")
                    await conn.execute(
                        f"INSERT INTO {schema}.schema_migrations (version, checksum) VALUES ($1, $2)",
                        m.version,
                        m.checksum,
                    )
                applied_now.append(m.version)
                log.info("migration_applied", schema=schema, version=m.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
    return applied_now


async def _ensure_roles(
    conn: asyncpg.Connection, schema: str, owner: str, login: str, password: str
) -> None:
    existing = {r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles")}
    if owner not in existing:
        await conn.execute(f"CREATE ROLE {owner} NOLOGIN")
    if login not in existing:
        await conn.execute(
            f"CREATE ROLE {login} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
            "PASSWORD " + _quote_literal(password)
        )
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {owner}")
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {login}")
    await conn.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {login}"
    )
    await conn.execute(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} "
        f"GRANT USAGE, SELECT ON SEQUENCES TO {login}"
    )
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
        "version text PRIMARY KEY, checksum text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    )


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
