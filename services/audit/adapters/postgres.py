"""The audit log in PostgreSQL: records and per-tenant chain heads (migrations/0001_audit.sql).

Appending is where several audit instances meet. Each tenant's chain has one ``chain_heads``
row, locked ``FOR UPDATE`` by the transaction that appends to it: the next records get
``seq = last_seq + 1 ...`` and chain to ``last_hash``, and the head moves in the same
transaction. Another instance appending to the same tenant waits on the lock and then sees what
was committed, so an event already recorded (redelivered, or handled by two instances at once)
is skipped, never chained twice. A batch locks its tenants' heads in one order (uuid order), so
two instances never wait on each other in a cycle. Locking and inserting are two SQL functions
(``migrations/0002_audit_append.sql``, replaced by ``0003_audit_append_faster.sql``) so a batch
costs the same four round trips whatever number of tenants it holds; both set each tenant with
``SET LOCAL`` before touching its rows.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncIterator, Sequence
from uuid import UUID

import asyncpg

from libs.db import tenant_transaction, transaction_on
from libs.envelope import Envelope
from libs.outbox import add_events
from services.audit.domain import (
    ChainHead,
    Entry,
    Record,
    Sealed,
    chain,
    seal,
)

__all__ = ["PostgresAuditLog", "ChainSnapshot", "RecordFilters", "SERVICE_SCHEMA"]

SERVICE_SCHEMA = "audit"

_SET_TENANT = "SELECT set_config('vge.org_id', $1, true)"

_COLUMNS = (
    "organization_id, seq, event_id, action, resource_type, resource_id, actor_user_id, "
    "actor_organization_id, actor_role, actor_is_platform_admin, actor_is_platform_staff, "
    "actor_type, change, correlation_id, causation_id, occurred_at, recorded_at, prev_hash, hash"
)

# Four round trips per batch, whatever its tenants: BEGIN, lock the heads (and learn which
# events are recorded already), insert and move the heads, COMMIT (migrations 0002 and 0003).
# The lock takes the tenant of each event id in a parallel array.
_LOCK_HEADS = (
    "SELECT head_org, head_seq, head_hash, known FROM lock_chain_heads($1::uuid[], $2::uuid[])"
)
_APPEND = (
    "SELECT append_records($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[], "
    "$6::text[], $7::text[], $8::uuid[], $9::text[], $10::boolean[], $11::boolean[], $12::text[], "
    "$13::text[], $14::text[], $15::text[], $16::timestamptz[], $17::timestamptz, $18::text[], "
    "$19::text[], $20::uuid[], $21::bigint[], $22::text[])"
)


@dataclass(frozen=True, slots=True)
class RecordFilters:
    """What a query selects within one tenant; None means "any"."""

    resource_type: str | None = None
    resource_id: str | None = None
    actor_user_id: str | None = None
    action: str | None = None
    correlation_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _record(row: asyncpg.Record) -> Record:
    actor_org = row["actor_organization_id"]
    actor = {
        "user_id": row["actor_user_id"],
        "organization_id": None if actor_org is None else str(actor_org),
        "role": row["actor_role"],
        "is_platform_admin": row["actor_is_platform_admin"],
        "is_platform_staff": row["actor_is_platform_staff"],
        "type": row["actor_type"],
    }
    entry = Entry(
        organization_id=row["organization_id"],
        event_id=row["event_id"],
        action=row["action"],
        resource_type=row["resource_type"],
        resource_id=row["resource_id"],
        actor=actor,
        change=row["change"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        occurred_at=row["occurred_at"],
    )
    return Record(entry, row["seq"], row["recorded_at"], row["prev_hash"], row["hash"])


class ChainSnapshot:
    """One tenant's chain as of one moment: its head and its records, page by page."""

    def __init__(self, conn: asyncpg.Connection, org: UUID, head: ChainHead | None) -> None:
        self._conn = conn
        self._org = org
        self.head = head

    async def pages(self, size: int = 2000) -> AsyncIterator[list[Record]]:
        """The records in ``seq`` order, ``size`` at a time (keyset pagination on the key)."""
        after = 0
        while True:
            rows = await self._conn.fetch(
                f"SELECT {_COLUMNS} FROM records WHERE organization_id = $1 AND seq > $2 "
                "ORDER BY seq LIMIT $3",
                self._org,
                after,
                size,
            )
            if not rows:
                return
            page = [_record(r) for r in rows]
            yield page
            after = page[-1].seq


class PostgresAuditLog:
    """The audit records and chain heads of the ``audit`` schema, through the service's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def append(
        self,
        entries: Sequence[Entry],
        recorded_at: datetime,
        *,
        publish: Sequence[Envelope] = (),
    ) -> list[Record]:
        """Chain ``entries`` to their tenants' chains in one transaction; the records appended.

        Entries whose event is already recorded (or repeated in the batch) are skipped.
        ``publish``: events of the audit service itself, written to its outbox in the same
        transaction.
        """
        unique: dict[UUID, Entry] = {}
        for entry in entries:
            unique.setdefault(entry.event_id, entry)
        if not unique:
            return []
        # the costly part (content digests, column values) before any lock is taken
        by_tenant: dict[UUID, list[Sealed]] = {}
        for item in seal(unique.values(), recorded_at):
            by_tenant.setdefault(item.entry.organization_id, []).append(item)
        static = {event_id: _static_columns(e) for event_id, e in unique.items()}
        appended: list[Record] = []
        heads: list[tuple[UUID, int, str]] = []
        async with self._pool.acquire() as conn:
            async with transaction_on(conn):  # (after_commit: add_events wakes the relay)
                locked = await conn.fetch(
                    _LOCK_HEADS, [e.organization_id for e in unique.values()], list(unique)
                )
                for head in locked:
                    known = set(head["known"])
                    tenant = by_tenant[head["head_org"]]
                    fresh = [i for i in tenant if i.entry.event_id not in known]
                    if fresh:
                        records, new = chain(fresh, ChainHead(head["head_seq"], head["head_hash"]))
                        appended += records
                        heads.append((head["head_org"], new.seq, new.hash))
                if appended:
                    added = await conn.fetchval(
                        _APPEND, *_record_columns(appended, static), *_head_columns(heads)
                    )
                    if added != len(appended):  # cannot happen under the locks; never guess
                        raise RuntimeError(f"appended {added} of {len(appended)} audit records")
                if publish:
                    await add_events(conn, SERVICE_SCHEMA, publish)
        return appended

    async def query(
        self, org: UUID, filters: RecordFilters, *, after_seq: int, limit: int
    ) -> list[Record]:
        """Up to ``limit`` matching records of the tenant after ``after_seq``, in chain order."""
        where = ["organization_id = $1", "seq > $2"]
        args: list[Any] = [org, after_seq]
        for column, op, value in (
            ("resource_type", "=", filters.resource_type),
            ("resource_id", "=", filters.resource_id),
            ("actor_user_id", "=", filters.actor_user_id),
            ("action", "=", filters.action),
            ("correlation_id", "=", filters.correlation_id),
            ("occurred_at", ">=", filters.since),
            ("occurred_at", "<", filters.until),
        ):
            if value is not None:
                args.append(value)
                where.append(f"{column} {op} ${len(args)}")
        args.append(limit)
        sql = (
            f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT ${len(args)}"
        )
        # row-level security shows only this tenant's rows, whatever the filters say
        async with tenant_transaction(self._pool, org, readonly=True) as conn:
            rows = await conn.fetch(sql, *args)
        return [_record(r) for r in rows]

    @asynccontextmanager
    async def snapshot(self, org: UUID) -> AsyncIterator[ChainSnapshot]:
        """A consistent view of one tenant's chain (head and records from one snapshot, so
        appends committed meanwhile are not half-seen as a broken chain). Like
        ``libs.db.tenant_transaction``, which offers no REPEATABLE READ."""
        async with self._pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute(_SET_TENANT, str(org))
                row = await conn.fetchrow(
                    "SELECT last_seq, last_hash FROM chain_heads WHERE organization_id = $1", org
                )
                head = None if row is None else ChainHead(row["last_seq"], row["last_hash"])
                yield ChainSnapshot(conn, org, head)


def _static_columns(e: Entry) -> tuple[Any, ...]:
    """An entry's column values that do not depend on its place in the chain."""
    a = e.actor
    return (
        e.organization_id,
        e.event_id,
        e.action,
        e.resource_type,
        e.resource_id,
        a["user_id"],
        a["organization_id"],  # text: asyncpg encodes it as uuid without a UUID object
        a["role"],
        a["is_platform_admin"],
        a["is_platform_staff"],
        a["type"],
        e.change_json,
        e.correlation_id,
        e.causation_id,
        e.occurred_at,
    )


def _record_columns(records: Sequence[Record], static: dict[UUID, tuple[Any, ...]]) -> list[Any]:
    """``append_records`` arguments $1 to $19: one array per column, and ``recorded_at``."""
    rows = [static[r.entry.event_id] for r in records]
    (orgs, event_ids, actions, resource_types, resource_ids, user_ids, actor_orgs, roles,
     admins, staff, actor_types, changes, correlation_ids, causation_ids, occurred) = (
        list(col) for col in zip(*rows)
    )
    return [
        orgs, [r.seq for r in records], event_ids, actions, resource_types, resource_ids,
        user_ids, actor_orgs, roles, admins, staff, actor_types, changes, correlation_ids,
        causation_ids, occurred, records[0].recorded_at, [r.prev_hash for r in records],
        [r.hash for r in records],
    ]


def _head_columns(heads: Sequence[tuple[UUID, int, str]]) -> list[list[Any]]:
    """``append_records`` arguments $20 to $22: each tenant's new head."""
    return [list(col) for col in zip(*heads)]
