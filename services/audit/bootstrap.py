"""Audit: one hash-chained record per mutation event, per tenant (design §4.3).

The one place that wires this service: the PostgreSQL audit log, the durable consumer of every
event (``vge.evt.>``, in batches; its lag gauges come with it), the query and verify commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from libs.context import CommandContext
from libs.contracts.audit import (
    AuditChainVerified,
    AuditRecords,
    CrossTenantRead,
    QueryAudit,
    VerifyAuditChain,
)
from libs.envelope import Envelope
from libs.errors import InvalidInput
from libs.runtime import ServiceRuntime, configure_service_logging, run_service
from libs.settings import Settings, get_settings
from services.audit import handlers
from services.audit.adapters.postgres import PostgresAuditLog

__all__ = ["SERVICE", "DURABLE", "build", "main"]

SERVICE = "audit"
MIGRATIONS = Path(__file__).parent / "migrations"

DURABLE = "audit"
"""The durable consumer every audit instance shares (JetStream splits the events among them)."""

BATCH = 500  # events per fetch and per transaction at most: throughput without long locks
# Batches in flight per instance: while one waits for its commit, the next is fetched and hashed.
BATCHES_IN_FLIGHT = 2
# An instance that dies holding a batch gets it redelivered to the others after this long;
# a batch takes milliseconds, so a few seconds is plenty and keeps a crash's delay short.
ACK_WAIT_SECONDS = 5.0


def build(settings: Settings) -> ServiceRuntime:
    """The audit service's runtime with its commands and consumers registered."""
    runtime = ServiceRuntime(SERVICE, settings, migrations_dir=MIGRATIONS)
    store: PostgresAuditLog | None = None

    def audit_log() -> PostgresAuditLog:
        if store is None:
            raise RuntimeError("the audit log is used before the runtime started")
        return store

    async def open_audit_log() -> None:
        nonlocal store
        assert runtime.pool is not None and runtime.js is not None
        store = PostgresAuditLog(runtime.pool)

    runtime.publishes(CrossTenantRead)
    runtime.on_start(open_audit_log)

    @runtime.router.command("query", QueryAudit, AuditRecords)
    async def query(ctx: CommandContext, request: QueryAudit) -> AuditRecords:
        """Read a tenant's audit records by resource, actor, action, time or correlation id."""
        return await handlers.query(audit_log(), ctx, request)

    @runtime.router.command("verify", VerifyAuditChain, AuditChainVerified)
    async def verify(ctx: CommandContext, request: VerifyAuditChain) -> AuditChainVerified:
        """Walk a tenant's hash chain and report the first broken link or gap."""
        return await handlers.verify(audit_log(), ctx, request)

    async def record_one(envelope: Envelope) -> None:
        await handlers.ingest(audit_log(), [envelope])

    async def record_batch(envelopes: Sequence[Envelope]) -> None:
        await handlers.ingest(audit_log(), envelopes)

    runtime.add_consumer(
        DURABLE,
        record_one,
        batch_handler=record_batch,
        batch=BATCH,
        concurrency=BATCHES_IN_FLIGHT,
        ack_wait=ACK_WAIT_SECONDS,
        # an event the domain refuses will be refused on every retry: dead-letter it at once
        permanent_errors=(InvalidInput,),
    )
    return runtime


def main() -> None:
    """Entry point of ``python -m services.audit``."""
    settings = get_settings()
    configure_service_logging(SERVICE, settings)
    run_service(build(settings))
