"""What the audit service does for each message: record events, answer queries, verify chains.

Thin on purpose: the rules are in ``domain``, the SQL in ``adapters.postgres``; here are the
policy checks and the order of things.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Sequence
from uuid import UUID

from pydantic import ValidationError

from libs.actor import Actor
from libs.context import CommandContext
from libs.contracts.audit import (
    AuditChainVerified,
    AuditRecord,
    AuditRecords,
    ChainProblemInfo,
    CrossTenantRead,
    QueryAudit,
    VerifyAuditChain,
)
from libs.envelope import Envelope, utcnow
from libs.errors import InvalidInput
from libs.log import get_logger
from libs.policy import Action, Resource, authorize
from services.audit import metrics
from services.audit.adapters.postgres import PostgresAuditLog, RecordFilters
from services.audit.domain import ChainVerifier, Record, entry_from_envelope

__all__ = ["ingest", "query", "verify", "verify_tenant", "RESOURCE_TYPE"]

log = get_logger(__name__)

RESOURCE_TYPE = "audit_log"
"""The policy resource type of a tenant's audit log."""


async def ingest(store: PostgresAuditLog, envelopes: Sequence[Envelope]) -> int:
    """Record a batch of events (one transaction); returns how many records were appended.

    Raises ``InvalidInput`` if any event cannot be recorded (nothing of the batch is then
    written; the consumer retries the events one by one to isolate it).
    """
    entries = [entry_from_envelope(e) for e in envelopes]
    started = time.perf_counter()
    appended = await store.append(entries, utcnow())
    committed = utcnow()
    metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
    metrics.INGEST_BATCH_SIZE.observe(len(entries))
    metrics.RECORDS_APPENDED.inc(len(appended))
    metrics.DUPLICATES_SKIPPED.inc(len(entries) - len(appended))
    for record in appended:
        metrics.RECORD_LAG_SECONDS.observe(
            max(0.0, (committed - record.entry.occurred_at).total_seconds())
        )
    return len(appended)


def _tenant(ctx: CommandContext, requested: UUID | None) -> UUID:
    org = requested or ctx.org_id
    if org is None:
        raise InvalidInput("organization_id is required when acting outside a tenant")
    return org


async def _record_cross_tenant_read(
    store: PostgresAuditLog,
    ctx: CommandContext,
    org: UUID,
    command: Literal["query", "verify"],
    filters: dict[str, Any],
) -> None:
    """Put a platform admin's read of ``org`` into ``org``'s own chain before the read happens
    (design §4.1), and publish it like every other event (same event id: recorded once)."""
    read = CrossTenantRead(organization_id=org, command=command, filters=filters)
    envelope = read.envelope(org, ctx.actor, ctx.correlation_id, causation_id=ctx.message_id)
    appended = await store.append([entry_from_envelope(envelope)], utcnow(), publish=[envelope])
    metrics.RECORDS_APPENDED.inc(len(appended))
    metrics.CROSS_TENANT_READS.inc()
    log.info("cross_tenant_read", organization_id=str(org), command=command)


def _authorize(ctx: CommandContext, action: Action, org: UUID) -> bool:
    """Policy check; returns whether this is a platform admin reading another tenant."""
    # another tenant's log is not_found, a role without audit access forbidden (libs.policy)
    authorize(ctx.actor, action, Resource(RESOURCE_TYPE, org))
    return ctx.actor.organization_id != org


def _actor(fields: dict[str, Any]) -> Actor:
    try:
        return Actor.model_validate(fields)
    except ValidationError:
        # a row edited into an impossible actor: show what is stored (verify reports the edit)
        return Actor.model_construct(**fields)


def _reply_record(record: Record) -> AuditRecord:
    e = record.entry
    return AuditRecord(
        organization_id=e.organization_id,
        seq=record.seq,
        event_id=e.event_id,
        action=e.action,
        resource_type=e.resource_type,
        resource_id=e.resource_id,
        actor=_actor(dict(e.actor)),
        change=dict(e.change),
        correlation_id=e.correlation_id,
        causation_id=e.causation_id,
        occurred_at=e.occurred_at,
        recorded_at=record.recorded_at,
        prev_hash=record.prev_hash,
        hash=record.hash,
    )


async def query(store: PostgresAuditLog, ctx: CommandContext, request: QueryAudit) -> AuditRecords:
    """One page of a tenant's records for its owners/admins or a platform admin.

    Row-level security scopes the read to that one tenant, so ids of another tenant's resources
    simply match nothing.
    """
    org = _tenant(ctx, request.organization_id)
    if _authorize(ctx, Action.AUDIT_READ, org):
        filters = request.model_dump(mode="json", exclude_none=True, exclude={"organization_id"})
        await _record_cross_tenant_read(store, ctx, org, "query", filters)
    records = await store.query(
        org,
        RecordFilters(
            resource_type=request.resource_type,
            resource_id=request.resource_id,
            actor_user_id=request.actor_user_id,
            action=request.action,
            correlation_id=request.correlation_id,
            since=request.since,
            until=request.until,
        ),
        after_seq=int(request.cursor or 0),
        limit=request.limit + 1,  # one more tells whether there is a next page
    )
    page = records[: request.limit]
    more = len(records) > request.limit
    return AuditRecords(
        records=[_reply_record(r) for r in page],
        next=str(page[-1].seq) if more else None,
    )


async def verify_tenant(store: PostgresAuditLog, org: UUID) -> AuditChainVerified:
    """Walk ``org``'s chain from the first record to the head; the first problem, if any."""
    verifier = ChainVerifier()
    async with store.snapshot(org) as snapshot:
        async for page in snapshot.pages():
            if verifier.feed(page):
                break
        problem = verifier.finish(snapshot.head)
        last_seq = snapshot.head.seq if snapshot.head else 0
    if problem:
        log.warning(
            "audit_chain_broken", organization_id=str(org), seq=problem.seq, kind=problem.kind
        )
    return AuditChainVerified(
        organization_id=org,
        ok=problem is None,
        records_checked=verifier.checked,
        last_seq=last_seq,
        problem=None
        if problem is None
        else ChainProblemInfo(
            seq=problem.seq, kind=problem.kind, event_id=problem.event_id, detail=problem.detail
        ),
    )


async def verify(
    store: PostgresAuditLog, ctx: CommandContext, request: VerifyAuditChain
) -> AuditChainVerified:
    """Verify a tenant's chain for its owners/admins or a platform admin (recorded)."""
    org = _tenant(ctx, request.organization_id)
    if _authorize(ctx, Action.AUDIT_VERIFY, org):
        await _record_cross_tenant_read(store, ctx, org, "verify", {})
    return await verify_tenant(store, org)
