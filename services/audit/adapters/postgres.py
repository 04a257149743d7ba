"""The audit log in PostgreSQL: records and per-tenant chain heads (migrations/0001_audit.sql).

Appending is where several audit instances meet. Each tenant's chain has one ``chain_heads``
row, locked ``FOR UPDATE`` by the transaction that appends to it: the next records get
``seq = last_seq + 1 ...`` and chain to ``last_hash``, and the head moves in the same
transaction. Another instance appending to the same tenant waits on the lock and then sees what
was committed, so an event already recorded (redelivered, or handled by two instances at once)
is skipped, never chained twice. A batch locks its tenants' heads in sorted order, so two
instances never wait on each other in a cycle.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncIterator, Sequence
from uuid import UUID

import asyncpg

from libs.envelope import Envelope
from libs.outbox import add_events
from services.audit.domain import (
    GENESIS_HASH,
    ChainHead,
    Entry,
    Record,
    canonical_json,
    chain,
)

__all__ = ["PostgresAuditLog", "ChainSnapshot", "RecordFilters", "SERVICE_SCHEMA"]

SERVICE_SCHEMA = "audit"

_SET_TENANT = "SELECT set_config('vge.org_id', $1, true)"

_COLUMNS = (
    "organization_id, seq, event_id, action, resource_type, resource_id, actor_user_id, "
    "actor_organization_id, actor_role, actor_is_platform_admin, actor_is_platform_staff, "
    "actor_type, change, correlation_id, causation_id, occurred_at, recorded_at, prev_hash, hash"
)

# One statement per tenant and batch: arrays in, one row per element (COPY is refused on tables
# with row-level security, and one INSERT per row would cost a round trip each).
_INSERT_RECORDS = f"""
INSERT INTO records ({_COLUMNS})
SELECT $1, t.seq, t.event_id, t.action, t.resource_type, t.resource_id, t.user_id, t.actor_org,
       t.role, t.is_admin, t.is_staff, t.actor_type, t.change::json, t.correlation_id,
       t.causation_id, t.occurred_at, $2, t.prev_hash, t.hash
FROM unnest($3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::uuid[], $10::text[], $11::bool[], $12::bool[], $13::text[], $14::text[],
            $15::text[], $16::text[], $17::timestamptz[], $18::text[], $19::text[])
     AS t(seq, event_id, action, resource_type, resource_id, user_id, actor_org, role,
          is_admin, is_staff, actor_type, change, correlation_id, causation_id, occurred_at,
          prev_hash, hash)
"""

_LOCK_HEAD = (
    "SELECT last_seq, last_hash FROM chain_heads WHERE organization_id = $1 FOR UPDATE"
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


def _uuid(value: Any) -> UUID | None:
    return None if value is None else UUID(str(value))


def _record(row: asyncpg.Record) -> Record:
    actor = {
        "user_id": row["actor_user_id"],
        "organization_id": None if row["actor_organization_id"] is None else str(row["actor_organization_id"]),
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
        by_tenant: dict[UUID, list[Entry]] = {}
        seen: set[UUID] = set()
        for entry in entries:
            if entry.event_id not in seen:
                seen.add(entry.event_id)
                by_tenant.setdefault(entry.organization_id, []).append(entry)
        appended: list[Record] = []
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                for org in sorted(by_tenant):  # one lock order for every instance
                    appended += await self._append_to_tenant(conn, org, by_tenant[org], recorded_at)
                if publish:
                    await add_events(conn, SERVICE_SCHEMA, publish)
        return appended

    async def _append_to_tenant(
        self, conn: asyncpg.Connection, org: UUID, entries: list[Entry], recorded_at: datetime
    ) -> list[Record]:
        await conn.execute(_SET_TENANT, str(org))
        head = await conn.fetchrow(_LOCK_HEAD, org)
        if head is None:
            # a new tenant: create its head; of two instances doing this at once, the second
            # waits for the first and then locks the row the first created
            await conn.execute(
                "INSERT INTO chain_heads (organization_id, last_seq, last_hash) "
                "VALUES ($1, 0, $2) ON CONFLICT (organization_id) DO NOTHING",
                org,
                GENESIS_HASH,
            )
            head = await conn.fetchrow(_LOCK_HEAD, org)
            assert head is not None
        # read after the lock: anything another instance recorded before us is visible now
        known = {
            r["event_id"]
            for r in await conn.fetch(
                "SELECT event_id FROM records WHERE organization_id = $1 AND event_id = ANY($2::uuid[])",
                org,
                [e.event_id for e in entries],
            )
        }
        fresh = [e for e in entries if e.event_id not in known]
        if not fresh:
            return []
        records, new_head = chain(fresh, ChainHead(head["last_seq"], head["last_hash"]), recorded_at)
        await conn.execute(_INSERT_RECORDS, org, recorded_at, *_columns(records))
        await conn.execute(
            "UPDATE chain_heads SET last_seq = $2, last_hash = $3, updated_at = now() "
            "WHERE organization_id = $1",
            org,
            new_head.seq,
            new_head.hash,
        )
        return records

    async def query(
        self, org: UUID, filters: RecordFilters, *, after_seq: int, limit: int
    ) -> list[Record]:
        """Up to ``limit`` of the tenant's records after ``after_seq`` that match, in chain order."""
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
        async with self._pool.acquire() as conn:
            async with conn.transaction(readonly=True):
                # row-level security shows only this tenant's rows, whatever the filters say
                await conn.execute(_SET_TENANT, str(org))
                rows = await conn.fetch(sql, *args)
        return [_record(r) for r in rows]

    @asynccontextmanager
    async def snapshot(self, org: UUID) -> AsyncIterator[ChainSnapshot]:
        """A consistent view of one tenant's chain (head and records from one snapshot, so
        appends committed meanwhile are not half-seen as a broken chain)."""
        async with self._pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute(_SET_TENANT, str(org))
                row = await conn.fetchrow(
                    "SELECT last_seq, last_hash FROM chain_heads WHERE organization_id = $1", org
                )
                head = None if row is None else ChainHead(row["last_seq"], row["last_hash"])
                yield ChainSnapshot(conn, org, head)


def _columns(records: Sequence[Record]) -> list[list[Any]]:
    """The per-column arrays of ``_INSERT_RECORDS`` ($3 onwards)."""
    cols: list[list[Any]] = [[] for _ in range(17)]
    for r in records:
        e, a = r.entry, r.entry.actor
        values = (
            r.seq,
            e.event_id,
            e.action,
            e.resource_type,
            e.resource_id,
            a["user_id"],
            _uuid(a["organization_id"]),
            a["role"],
            a["is_platform_admin"],
            a["is_platform_staff"],
            a["type"],
            canonical_json(e.change),
            e.correlation_id,
            e.causation_id,
            e.occurred_at,
            r.prev_hash,
            r.hash,
        )
        for col, value in zip(cols, values):
            col.append(value)
    return cols
