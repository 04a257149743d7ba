"""Operator commands of the audit service: ``python -m services.audit.cli verify ORG_ID``.

Verification here needs no gateway and no running audit service, only the database: it logs in
as the audit service's role (row-level security applies), walks the tenant's chain and prints
the outcome as JSON. Exit status: 0 intact, 1 broken, 2 could not verify.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from uuid import UUID

from libs.contracts.audit import AuditChainVerified
from libs.db import create_pool, service_dsn
from libs.errors import DomainError
from libs.log import configure_logging
from libs.runtime import MissingConfiguration
from libs.settings import Settings
from services.audit import handlers
from services.audit.adapters.postgres import PostgresAuditLog
from services.audit.bootstrap import SERVICE

__all__ = ["verify_cli", "main"]

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2


async def _verify(settings: Settings, org: UUID) -> AuditChainVerified:
    if not (settings.service_database_url or settings.database_url):
        raise MissingConfiguration("set VGE_DATABASE_URL (or VGE_SERVICE_DATABASE_URL) to verify")
    dsn = settings.service_database_url or service_dsn(
        settings.database_url or "", SERVICE, settings.db_role_password
    )
    pool = await create_pool(dsn, schema=SERVICE, min_size=1, max_size=1)
    try:
        return await handlers.verify_tenant(PostgresAuditLog(pool), org)
    finally:
        await pool.close()


def verify_cli(org_id: str) -> int:
    """Verify one tenant's audit chain; prints JSON, returns the exit status (1 when broken)."""
    try:
        org = UUID(org_id)
    except ValueError:
        print(f"not an organization id: {org_id!r}", file=sys.stderr)
        return EXIT_ERROR
    settings = Settings()
    # stdout is the JSON report alone; log lines go to stderr
    configure_logging(settings.log_level, settings.log_format, service=SERVICE)
    try:
        result = asyncio.run(_verify(settings, org))
    except (DomainError, MissingConfiguration) as exc:
        print(getattr(exc, "detail", None) or str(exc), file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - an operator tool: say what failed, no traceback
        print(f"could not verify: {exc!r}", file=sys.stderr)
        return EXIT_ERROR
    print(result.model_dump_json(indent=2))
    return EXIT_OK if result.ok else EXIT_BROKEN


def main(argv: list[str] | None = None) -> int:
    """Parse ``verify ORG_ID`` and run it."""
    parser = argparse.ArgumentParser(prog="python -m services.audit.cli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="walk a tenant's hash chain")
    verify.add_argument("org_id", help="the organization (tenant) id")
    args = parser.parse_args(argv)
    return verify_cli(args.org_id)


if __name__ == "__main__":
    sys.exit(main())
