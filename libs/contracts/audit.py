"""Commands and replies of the audit service (design §4.3), and the one event it publishes.

``vge.cmd.audit.query`` (:class:`QueryAudit` -> :class:`AuditRecords`) reads one tenant's audit
records; ``vge.cmd.audit.verify`` (:class:`VerifyAuditChain` -> :class:`AuditChainVerified`)
walks one tenant's hash chain. Both are for the tenant's owners and admins, and for platform
admins, whose read of another tenant is itself recorded (:class:`CrossTenantRead`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal
from uuid import UUID

from pydantic import BaseModel, Field, model_validator

from libs.actor import Actor
from libs.contracts import Command, EventData, Reply

__all__ = [
    "QueryAudit",
    "AuditRecord",
    "AuditRecords",
    "VerifyAuditChain",
    "ChainProblemInfo",
    "AuditChainVerified",
    "CrossTenantRead",
    "MAX_PAGE",
]

MAX_PAGE = 500
"""The most records one query returns; ``next`` pages on."""


class QueryAudit(Command):
    """Read one tenant's audit records, oldest first, filtered, a page at a time.

    Every filter is optional and they combine with AND. ``organization_id`` defaults to the
    tenant of the command context; only a platform admin may name another one.
    """

    organization_id: UUID | None = Field(
        default=None, description="Tenant to read; default: the caller's tenant."
    )
    resource_type: str | None = Field(default=None, max_length=100, examples=["ticket"])
    resource_id: str | None = Field(default=None, max_length=200)
    actor_user_id: str | None = Field(default=None, max_length=200)
    action: str | None = Field(
        default=None, max_length=200, description="Event type, e.g. 'scan.accepted'."
    )
    correlation_id: str | None = Field(default=None, max_length=200)
    since: datetime | None = Field(default=None, description="occurred_at at or after (inclusive).")
    until: datetime | None = Field(default=None, description="occurred_at before (exclusive).")
    cursor: str | None = Field(
        default=None,
        max_length=18,
        pattern=r"^[0-9]+$",
        description="``next`` of the previous page.",
    )
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)

    @model_validator(mode="after")
    def _aware_times(self) -> "QueryAudit":
        # a naive time means a different instant on every host: refuse it rather than guess
        for value in (self.since, self.until):
            if value is not None and value.utcoffset() is None:
                raise ValueError("since/until must carry a timezone")
        return self


class AuditRecord(BaseModel):
    """One event as the audit log keeps it, with its place in the tenant's hash chain."""

    organization_id: UUID
    seq: int = Field(description="Position in the tenant's chain, from 1, without gaps.")
    event_id: UUID
    action: str = Field(description="The event type, e.g. 'scan.accepted'.")
    resource_type: str
    resource_id: str | None
    actor: Actor
    change: dict[str, Any] = Field(description="The event's data, secrets removed.")
    correlation_id: str
    causation_id: str | None
    occurred_at: datetime
    recorded_at: datetime
    prev_hash: str = Field(description="Hash of record seq-1 (64 zeros for the first).")
    hash: str = Field(description="sha256 over this record's canonical content and prev_hash.")


class AuditRecords(Reply):
    """A page of audit records; ``next`` is the cursor of the following page, None at the end."""

    records: list[AuditRecord]
    next: str | None = None


class VerifyAuditChain(Command):
    """Walk one tenant's audit chain and report the first broken link or gap."""

    organization_id: UUID | None = Field(
        default=None, description="Tenant to verify; default: the caller's tenant."
    )


class ChainProblemInfo(BaseModel):
    """The first problem of a chain: which record, what kind, and what was seen."""

    seq: int
    kind: Literal["tampered", "broken_link", "missing"]
    event_id: UUID | None = Field(default=None, description="The record's event, if it exists.")
    detail: str


class AuditChainVerified(Reply):
    """The outcome of walking a chain: ``ok``, or the first ``problem``."""

    organization_id: UUID
    ok: bool
    records_checked: int = Field(description="Records found intact before the first problem.")
    last_seq: int = Field(description="Where the chain head says the chain ends.")
    problem: ChainProblemInfo | None = None


class CrossTenantRead(EventData):
    """A platform admin read another tenant's audit log (recorded in that tenant's chain)."""

    event_type: ClassVar[str] = "audit.cross_tenant_read"
    service: ClassVar[str] = "audit"

    organization_id: UUID = Field(description="The tenant whose records were read.")
    command: Literal["query", "verify"]
    filters: dict[str, Any] = Field(default_factory=dict)
