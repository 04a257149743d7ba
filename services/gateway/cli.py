"""Operator commands of the gateway: ``python -m services.gateway.cli tenant-create NAME``.

``vge tenant create NAME`` runs this against the servers in the environment (``VGE_*_URL``) or
the running ``vge up`` stack. It needs only PostgreSQL: it migrates the gateway's schema, then
creates the tenant and its first owner key in one transaction, with their events in the
gateway's outbox (the running gateway's relay publishes them to the audit log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from uuid import UUID

from libs.actor import Actor
from libs.db import create_pool, service_dsn
from libs.log import configure_logging
from libs.migrations import migrate
from libs.runtime import MissingConfiguration
from libs.settings import Settings
from services.gateway.adapters.postgres import SERVICE, GatewayStore
from services.gateway.bootstrap import MIGRATIONS

__all__ = ["create_tenant", "main"]


async def create_tenant(settings: Settings, name: str) -> tuple[UUID, str]:
    """A new tenant and its owner API key (shown once)."""
    if not settings.database_url:
        raise MissingConfiguration("set VGE_DATABASE_URL (or start `vge up`) to create a tenant")
    await migrate(settings.database_url, SERVICE, MIGRATIONS, role_password=settings.db_role_password)
    dsn = settings.service_database_url or service_dsn(settings.database_url, SERVICE,
                                                       settings.db_role_password)  # fmt: skip
    pool = await create_pool(dsn, schema=SERVICE, min_size=1, max_size=1)
    try:
        return await GatewayStore(pool).create_organization(
            name, Actor.system("vge-cli"), correlation_id="vge-tenant-create")
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    """Parse ``tenant-create NAME``, print ``{organization_id, api_key}`` as JSON."""
    parser = argparse.ArgumentParser(prog="python -m services.gateway.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("tenant-create", help="create a tenant and its owner key")
    create.add_argument("name", help="the organization's name")
    args = parser.parse_args(argv)
    name = args.name.strip()
    if not 1 <= len(name) <= 200:
        print("the name must be 1-200 characters", file=sys.stderr)
        return 2
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, service=SERVICE)  # to stderr
    try:
        org, key = asyncio.run(create_tenant(settings, name))
    except MissingConfiguration as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - an operator tool: say what failed, no traceback
        print(f"could not create the tenant: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps({"organization_id": str(org), "name": name, "api_key": key}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
