"""Payments' SQL: catalog, inventory holds, checkouts, tickets and the ledger (asyncpg).

Every tenant read or write runs in a tenant-scoped transaction (row-level security, the tenant
set with ``SET LOCAL`` so it dies with the transaction). Two things reach across tenants, and
only to find work, never to change it: the hold-expiry sweep and the saga resumer list the ids
of due checkouts in a read-only transaction; each change then happens in that checkout's own
tenant transaction.

A running saga holds a PostgreSQL session advisory lock on its checkout for as long as it runs
(:meth:`PaymentsStore.saga_session`): replicas and the resumer never drive one checkout at the
same time, and a crashed process's lock disappears with its connection.

Round trips are the cost of this service (each one is a send, a wake-up of the database and a
wake-up of this process), so each step of a checkout is ONE statement, its own transaction:
a PL/pgSQL function of migrations/0002 and 0003 that sets the tenant transaction-locally first
(exactly as ``tenant_transaction`` does; the functions run as the calling, non-owner role, so
row-level security applies to every query in them) and writes the state change and its
outbox rows together. A checkout costs four: ``checkout_create`` (checkout, holds, stock,
event), ``checkout_open`` (saga lock + pending -> charging), the processor's charge,
``checkout_finish`` (charge, sale, tickets, events, unlock). Concurrent creations and
finishes of one tenant go together in one statement (``checkout_create_many``,
``checkout_finish_many``) while the previous one is in flight, so under load a commit carries
many checkouts; each still succeeds or fails on its own. The store's pool skips asyncpg's
reset query on release (``libs.db.create_pool``). The other steps (compensation, refunds,
resuming sagas found in ``charged`` or ``posted``) keep their multi-statement transactions.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from libs.actor import Actor
from libs.batching import TenantBatches
from libs.db import create_pool, rollback_quietly, tenant_transaction_on
from libs.envelope import Envelope
from libs.outbox import outbox_committed, outbox_rows
from services.payments.domain.checkout import (
    CheckoutStatus,
    FailureReason,
    ensure_transition,
)
from services.payments.domain.ledger import (
    CHART_OF_ACCOUNTS,
    JournalEntry,
    JournalLine,
    ReferenceType,
    Side,
)
from services.payments.domain.money import Money

__all__ = [
    "PaymentsStore",
    "SagaSession",
    "SagaBusy",
    "CheckoutRecord",
    "HeldItem",
    "TicketTypeRow",
    "EventRow",
    "SoldOut",
    "UnknownTicketType",
    "LostRace",
    "CatalogChanged",
    "CompletionClaim",
    "create_store_pool",
]


class SoldOut(Exception):
    """Not enough tickets of a type are left for a hold."""

    def __init__(self, ticket_type: str, available: int) -> None:
        super().__init__(f"ticket type {ticket_type} has {available} left")
        self.ticket_type = ticket_type
        self.available = available


class UnknownTicketType(Exception):
    """A checkout named a ticket type its event does not have."""

    def __init__(self, ticket_type: str) -> None:
        super().__init__(f"no ticket type {ticket_type!r} in this event")
        self.ticket_type = ticket_type


class LostRace(Exception):
    """A conditional state change found the checkout in another state than expected."""


class CatalogChanged(Exception):
    """A ticket type did not match what the caller priced the checkout with (a stale cache;
    nothing was written)."""


class SagaBusy(Exception):
    """Another runner (a replica, a concurrent retry, the resumer) drives this checkout."""


@dataclass(frozen=True, slots=True)
class TicketTypeRow:
    """A ticket type as stored, with its live stock."""

    ticket_type_id: UUID
    code: str
    name: str
    price: Money
    quantity: int
    reserved: int
    zones: tuple[str, ...]

    @property
    def available(self) -> int:
        """What can still be held."""
        return self.quantity - self.reserved


@dataclass(frozen=True, slots=True)
class EventRow:
    """An event as stored."""

    event_id: UUID
    name: str
    starts_at: datetime
    ends_at: datetime
    valid_from: datetime | None
    valid_until: datetime | None
    capacity: int
    reentry_allowed: bool
    zones: tuple[str, ...]
    ticket_types: tuple[TicketTypeRow, ...]


@dataclass(frozen=True, slots=True)
class HeldItem:
    """One hold of a checkout: how many of which type, at which price."""

    ticket_type_id: UUID
    ticket_type: str
    quantity: int
    unit_price: Money
    state: str = "active"


@dataclass(frozen=True, slots=True)
class CheckoutRecord:
    """A checkout row and its holds: the saga's persisted state."""

    organization_id: UUID
    checkout_id: UUID
    event_id: UUID
    status: CheckoutStatus
    total: Money
    expires_at: datetime
    completion_key: str | None
    charge_id: str | None
    refund_id: str | None
    failure_reason: FailureReason | None
    completion: dict[str, Any] | None
    refund: dict[str, Any] | None
    actor: Actor | None
    correlation_id: str | None
    causation_id: str | None
    items: tuple[HeldItem, ...]


@dataclass(frozen=True, slots=True)
class CompletionClaim:
    """Who asks to complete a checkout, with which Idempotency-Key (``SagaSession.open``)."""

    key: str
    actor: Actor
    correlation_id: str
    causation_id: str | None


_CHECKOUT_COLUMNS = """
       c.organization_id, c.id, c.event_id, c.status, c.total, c.currency, c.expires_at,
       c.completion_key, c.charge_id, c.refund_id, c.failure_reason, c.completion, c.refund,
       c.actor, c.correlation_id, c.causation_id,
       (SELECT coalesce(json_agg(json_build_object(
                   'ticket_type_id', h.ticket_type_id, 'ticket_type', h.ticket_type,
                   'quantity', h.quantity, 'unit_price', h.unit_price, 'state', h.state)
                   ORDER BY h.ticket_type), '[]'::json)
          FROM holds h
         WHERE h.organization_id = c.organization_id AND h.checkout_id = c.id) AS items
"""
_CHECKOUT_SELECT = f"SELECT {_CHECKOUT_COLUMNS} FROM checkouts c"


def _checkout(row: asyncpg.Record) -> CheckoutRecord:
    currency = row["currency"]
    return CheckoutRecord(
        organization_id=row["organization_id"],
        checkout_id=row["id"],
        event_id=row["event_id"],
        status=CheckoutStatus(row["status"]),
        total=Money(row["total"], currency),
        expires_at=row["expires_at"],
        completion_key=row["completion_key"],
        charge_id=row["charge_id"],
        refund_id=row["refund_id"],
        failure_reason=FailureReason(row["failure_reason"]) if row["failure_reason"] else None,
        completion=row["completion"],
        refund=row["refund"],
        actor=Actor.model_validate(row["actor"]) if row["actor"] else None,
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        items=tuple(
            HeldItem(
                ticket_type_id=UUID(i["ticket_type_id"]),
                ticket_type=i["ticket_type"],
                quantity=i["quantity"],
                unit_price=Money(i["unit_price"], currency),
                state=i["state"],
            )
            for i in row["items"]
        ),
    )


def _saga_lock_key(checkout_id: UUID) -> str:
    return f"vge.payments.checkout:{checkout_id}"


class SagaSession:
    """One connection that may hold a checkout's saga lock; its transactions are tenant-scoped."""

    def __init__(self, conn: asyncpg.Connection, org_id: UUID, checkout_id: UUID) -> None:
        self.conn = conn
        self.org_id = org_id
        self.checkout_id = checkout_id
        self.locked = False  # (maybe) holding the saga lock
        self.claimed = False  # ``open(claim=...)`` moved the checkout to charging

    def transaction(self, *, readonly: bool = False):
        """A tenant transaction on this session's connection."""
        return tenant_transaction_on(self.conn, self.org_id, readonly=readonly)

    async def open(self, claim: "CompletionClaim | None" = None) -> CheckoutRecord | None:
        """Take the saga lock and read the checkout, in one statement (``checkout_open``, its
        own tenant transaction); with ``claim``, also move a pending checkout whose holds have
        not lapsed to ``charging`` with the claim's Idempotency-Key and requester (committed
        when this returns: the intent is durable before the processor is called; see
        ``claimed``). None if the tenant has no such checkout (then no lock is taken: the
        lock is evaluated only for a visible row); ``SagaBusy`` if another runner holds it."""
        # Pessimistic until the answer says otherwise: if the statement fails after taking the
        # lock (a reused completion key), the lock is still held (session locks are not
        # transactional) and must be let go of when the session ends.
        self.locked = True
        try:
            if claim is None:
                row = await self.conn.fetchrow(
                    "SELECT * FROM checkout_open($1, $2, $3)",
                    self.org_id, self.checkout_id, _saga_lock_key(self.checkout_id),
                )  # fmt: skip
            else:
                row = await self.conn.fetchrow(
                    "SELECT * FROM checkout_open($1, $2, $3, $4, $5, $6, $7)",
                    self.org_id, self.checkout_id, _saga_lock_key(self.checkout_id), claim.key,
                    claim.actor.model_dump(mode="json"), claim.correlation_id, claim.causation_id,
                )  # fmt: skip
        except BaseException:
            await self.rollback()
            raise
        if row is None:
            self.locked = False
            return None
        if not row["locked"]:
            self.locked = False
            raise SagaBusy(f"checkout {self.checkout_id} is being driven elsewhere")
        self.claimed = bool(row["claimed"])
        return _checkout(row)

    async def commit(self) -> None:
        """End a transaction left open on this session, if any (``open`` leaves none: its
        statement is its own transaction; kept so callers read as before)."""
        if self.conn.is_in_transaction():
            await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        """Abandon the transaction ``open`` began, if it is still open."""
        await rollback_quietly(self.conn)


async def create_store_pool(dsn: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    """The store's own pool (``libs.db.create_pool``: no reset query on release). The one
    session lock (the saga lock) is released by ``saga_session`` or its connection is
    dropped."""
    return await create_pool(dsn, schema=SERVICE_SCHEMA, min_size=min_size, max_size=max_size)


SERVICE_SCHEMA = "payments"
_CATALOG_CACHE_SIZE = 4096


class PaymentsStore:
    """The SQL of the payments service. Methods taking ``conn`` run inside the caller's
    (tenant-scoped) transaction; the others open their own."""

    def __init__(self, pool: asyncpg.Pool | None = None) -> None:
        self._pool = pool
        # (tenant, event) -> {code: ticket type as an unheld item}. Ticket types never change
        # once created (only their stock, which is not cached), and ``checkout_create``
        # re-checks price, currency, code and event under the row lock anyway.
        self._catalog: OrderedDict[tuple[UUID, UUID], dict[str, HeldItem]] = OrderedDict()
        # checkouts waiting to be created, per tenant, and the task creating them
        self._creates: TenantBatches[_NewCheckout] = TenantBatches(
            "create", self._create_many, one=self._create_one, limit=_CREATE_BATCH,
            interrupted="checkout not created; retry")
        # sagas waiting to be finished, per tenant, and the task finishing them
        # (interrupted: the outcome is unknown, the resumer settles it)
        self._finishes: TenantBatches[_Finish] = TenantBatches(
            "finish", self._finish_many, one=self._finish_alone, accept=self._finished,
            limit=_FINISH_BATCH, interrupted="completion outcome unknown; retry",
            # finishes share no row (each its own checkout, holds and tickets): two at once
            in_flight=2)

    def attach(self, pool: asyncpg.Pool) -> None:
        """Use ``pool`` (the runtime's, which exists only once the service has started)."""
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        """The service's connection pool."""
        if self._pool is None:
            raise RuntimeError("PaymentsStore used before the service started")
        return self._pool

    # -- transactions and locks -------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self, org_id: UUID, *, readonly: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A tenant-scoped transaction on a pooled connection."""
        async with self.pool.acquire() as conn:
            async with tenant_transaction_on(conn, org_id, readonly=readonly):
                yield conn

    @asynccontextmanager
    async def saga_session(self, org_id: UUID, checkout_id: UUID) -> AsyncIterator[SagaSession]:
        """A connection for driving one checkout; the saga lock taken by ``SagaSession.open``
        is released when the block ends (``checkout_finish`` already lets go of it on the happy
        path). The pool does not reset connections (``libs.db.create_pool``), so a lock that
        cannot be released for sure is dropped with its connection instead."""
        async with self.pool.acquire() as conn:
            session = SagaSession(conn, org_id, checkout_id)
            try:
                yield session
            finally:
                await session.rollback()  # a transaction left open by an error
                if session.locked and not conn.is_closed():
                    try:
                        # a connection drives one checkout at a time: all of its advisory
                        # locks are this saga's (and none is an error)
                        await conn.execute("SELECT pg_advisory_unlock_all()")
                        session.locked = False
                    finally:
                        if session.locked:  # cancelled or failed: never pool a held lock
                            conn.terminate()

    # -- catalog ----------------------------------------------------------------------------

    async def ensure_chart(self, conn: asyncpg.Connection, org_id: UUID) -> None:
        """Give the tenant its chart of accounts (once)."""
        codes, names, kinds = zip(*((str(c), n, str(k)) for c, (n, k) in CHART_OF_ACCOUNTS.items()))
        await conn.execute(
            "INSERT INTO accounts (organization_id, code, name, kind) "
            "SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING",
            org_id, list(codes), list(names), list(kinds),
        )  # fmt: skip

    async def event_id_by_key(self, conn: asyncpg.Connection, key: str) -> UUID | None:
        """The event created with idempotency key ``key``, if any."""
        return await conn.fetchval("SELECT id FROM events WHERE idempotency_key = $1", key)

    async def insert_event(
        self, conn: asyncpg.Connection, org_id: UUID, event: EventRow, idempotency_key: str | None
    ) -> None:
        """Store a new event and its ticket types."""
        types = event.ticket_types
        await conn.execute(
            "WITH e AS ("
            "  INSERT INTO events (organization_id, id, name, starts_at, ends_at, valid_from, "
            "  valid_until, capacity, reentry_allowed, zones, idempotency_key) "
            "  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id) "
            "INSERT INTO ticket_types (organization_id, id, event_id, code, name, price, currency, "
            "quantity, zones) "
            "SELECT $1, t.id, e.id, t.code, t.name, t.price, t.currency, t.quantity, "
            "       coalesce((SELECT array_agg(z) FROM jsonb_array_elements_text(t.zones::jsonb) z), '{}') "
            "FROM e, unnest($12::uuid[], $13::text[], $14::text[], $15::bigint[], $16::text[], "
            "               $17::int[], $18::text[]) AS t(id, code, name, price, currency, quantity, zones)",
            org_id, event.event_id, event.name, event.starts_at, event.ends_at, event.valid_from,
            event.valid_until, event.capacity, event.reentry_allowed, list(event.zones),
            idempotency_key,
            [t.ticket_type_id for t in types], [t.code for t in types], [t.name for t in types],
            [t.price.amount for t in types], [t.price.currency for t in types],
            # zones per type as JSON text: a text[][] must be rectangular, these lists are not
            [t.quantity for t in types], [json.dumps(list(t.zones)) for t in types],
        )  # fmt: skip

    async def load_event(self, conn: asyncpg.Connection, event_id: UUID) -> EventRow | None:
        """An event of the current tenant with its ticket types' live stock."""
        row = await conn.fetchrow("SELECT * FROM events WHERE id = $1", event_id)
        if row is None:
            return None
        types = await conn.fetch(
            "SELECT * FROM ticket_types WHERE event_id = $1 ORDER BY code", event_id
        )
        return EventRow(
            event_id=row["id"],
            name=row["name"],
            starts_at=row["starts_at"],
            ends_at=row["ends_at"],
            valid_from=row["valid_from"],
            valid_until=row["valid_until"],
            capacity=row["capacity"],
            reentry_allowed=row["reentry_allowed"],
            zones=tuple(row["zones"]),
            ticket_types=tuple(
                TicketTypeRow(
                    ticket_type_id=t["id"], code=t["code"], name=t["name"],
                    price=Money(t["price"], t["currency"]), quantity=t["quantity"],
                    reserved=t["reserved"], zones=tuple(t["zones"]),
                )  # fmt: skip
                for t in types
            ),
        )

    # -- holds and checkouts ----------------------------------------------------------------

    async def checkout_id_by_create_key(self, conn: asyncpg.Connection, key: str) -> UUID | None:
        """The checkout created with idempotency key ``key``, if any."""
        return await conn.fetchval("SELECT id FROM checkouts WHERE create_key = $1", key)

    async def ticket_types_for(
        self, conn: asyncpg.Connection, event_id: UUID, codes: Sequence[str]
    ) -> list[HeldItem]:
        """The named ticket types of an event as (unheld) items with quantity 0 and their
        prices; ``UnknownTicketType`` for a code the event does not have."""
        rows = {
            r["code"]: r
            for r in await conn.fetch(
                "SELECT id, code, price, currency FROM ticket_types "
                "WHERE event_id = $1 AND code = ANY($2::text[])",
                event_id, list(codes),
            )  # fmt: skip
        }
        for code in codes:
            if code not in rows:
                raise UnknownTicketType(code)
        return [
            HeldItem(rows[c]["id"], c, 0, Money(rows[c]["price"], rows[c]["currency"])) for c in codes
        ]

    async def ticket_types_of(self, org_id: UUID, event_id: UUID) -> dict[str, HeldItem] | None:
        """Every ticket type of an event as unheld items by code (cached: they never change),
        or None if the tenant has no such event (or it has no types)."""
        key = (org_id, event_id)
        types = self._catalog.get(key)
        if types is not None:
            self._catalog.move_to_end(key)
            return types
        async with self.transaction(org_id, readonly=True) as conn:
            rows = await conn.fetch(
                "SELECT id, code, price, currency FROM ticket_types WHERE event_id = $1", event_id
            )
        if not rows:
            return None
        types = {r["code"]: HeldItem(r["id"], r["code"], 0, Money(r["price"], r["currency"])) for r in rows}
        self._catalog[key] = types
        if len(self._catalog) > _CATALOG_CACHE_SIZE:
            self._catalog.popitem(last=False)
        return types

    def forget_ticket_types(self, org_id: UUID, event_id: UUID) -> None:
        """Drop an event's cached ticket types."""
        self._catalog.pop((org_id, event_id), None)

    async def create_checkout(
        self,
        org_id: UUID,
        checkout_id: UUID,
        event_id: UUID,
        customer_email: str,
        total: Money,
        expires_at: datetime,
        items: Sequence[HeldItem],
        create_key: str | None,
        events: Sequence[Envelope],
    ) -> UUID | None:
        """Store a pending checkout, its holds and its events and take the stock, in its own
        tenant transaction, together with the tenant's other checkouts being created right now
        (one statement, ``checkout_create_many``, while the previous one is in flight; a
        checkout alone goes by itself at once). Returns the earlier checkout's id if
        ``create_key`` was used before (then nothing is written). Raises ``SoldOut`` or
        ``CatalogChanged`` (nothing written for this checkout)."""
        new = _NewCheckout(checkout_id, event_id, customer_email, total, expires_at, tuple(items),
                           create_key, _own_outbox_rows(org_id, events))  # fmt: skip
        return await asyncio.shield(self._creates.submit(org_id, new))

    async def _create_many(self, org_id: UUID, batch: Sequence[_NewCheckout]) -> list[Any]:
        item_of: list[int] = []
        items: list[HeldItem] = []
        event_of: list[int] = []
        event_ids: list[Any] = []
        subjects: list[str] = []
        payloads: list[bytes] = []
        for n, new in enumerate(batch, start=1):
            item_of += [n] * len(new.items)
            items += new.items
            ids, _, subj, pay = new.outbox
            event_of += [n] * len(ids)
            event_ids += ids
            subjects += subj
            payloads += pay
        rows = await self.pool.fetch(
            "SELECT * FROM checkout_create_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14, $15, $16, $17)",
            org_id, [b.checkout_id for b in batch], [b.event_id for b in batch],
            [b.customer_email for b in batch], [b.total.amount for b in batch],
            [b.total.currency for b in batch], [b.expires_at for b in batch],
            [b.create_key for b in batch],
            item_of, [i.ticket_type_id for i in items], [i.ticket_type for i in items],
            [i.quantity for i in items], [i.unit_price.amount for i in items],
            event_of, event_ids, subjects, payloads,
        )  # fmt: skip
        outbox_committed(SERVICE_SCHEMA)  # the statement was its own transaction
        outcomes: list[Any] = [None] * len(batch)
        for r in rows:
            if r["existing"] is not None:
                outcomes[r["i"] - 1] = r["existing"]
            elif r["error"] == "sold_out":
                outcomes[r["i"] - 1] = SoldOut(r["ticket_type"], r["available"])
            elif r["error"] == "catalog_changed":
                outcomes[r["i"] - 1] = CatalogChanged(r["ticket_type"])
        return outcomes

    async def _create_one(self, org_id: UUID, new: _NewCheckout) -> UUID | None:
        event_ids, _, subjects, payloads = new.outbox
        items = new.items
        try:
            existing = await self.pool.fetchval(
                "SELECT checkout_create($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
                "$13, $14, $15)",
                org_id, new.checkout_id, new.event_id, new.customer_email, new.total.amount,
                new.total.currency, new.expires_at, new.create_key,
                [i.ticket_type_id for i in items], [i.ticket_type for i in items],
                [i.quantity for i in items], [i.unit_price.amount for i in items],
                event_ids, subjects, payloads,
            )  # fmt: skip
            outbox_committed(SERVICE_SCHEMA)
            return existing
        except asyncpg.RaiseError as exc:
            if exc.message == "vge_sold_out":
                raise SoldOut(exc.detail or "?", int(exc.hint or 0)) from exc
            if exc.message == "vge_catalog_changed":
                raise CatalogChanged(exc.detail or "?") from exc
            raise

    async def finish_checkout(
        self,
        session: SagaSession,
        checkout: CheckoutRecord,
        charge_id: str | None,
        entry: JournalEntry | None,
        posted_at: datetime,
        tickets: Sequence[tuple[str, HeldItem]],
        issued_at: datetime,
        completion: dict[str, Any],
        events: Sequence[Envelope],
    ) -> None:
        """charging -> completed in its own tenant transaction: the charge recorded, the sale's
        entry booked (balanced: checked by the database), the tickets issued, the holds
        consumed, the events queued. Sagas of the tenant finishing at the same moment go
        together (one statement, ``checkout_finish_many``, run on the first one's connection);
        one alone goes at once with ``checkout_finish``, which also lets go of its saga lock.
        ``LostRace`` (nothing written) if the checkout was no longer ``charging``; a database
        error is this saga's own (a failed batch is retried saga by saga)."""
        ensure_transition(checkout.status, CheckoutStatus.COMPLETED)
        fin = _Finish(session, checkout, charge_id, entry, posted_at, tickets, issued_at,
                      completion, tuple(events))  # fmt: skip
        if checkout.status is not CheckoutStatus.CHARGING:  # (only charging is batched)
            return await self._finish_one(fin)
        result = self._finishes.submit(checkout.organization_id, fin)
        try:
            await asyncio.shield(result)
        except asyncio.CancelledError:
            # the batch may be running on this session's connection: never hand it back to
            # the pool (or unlock on it) before that statement has ended
            await asyncio.wait([result])
            raise

    async def _finish_alone(self, org_id: UUID, f: _Finish) -> bool:
        await self._finish_one(f)
        return True

    @staticmethod
    def _finished(f: _Finish, moved: bool) -> Any:
        return True if moved else LostRace(f"checkout {f.checkout.checkout_id} is no longer charging")

    async def _finish_many(self, org_id: UUID, batch: Sequence[_Finish]) -> list[bool]:
        ticket_of: list[int] = []
        tickets: list[tuple[str, HeldItem]] = []
        line_of: list[int] = []
        lines: list[JournalLine] = []
        event_of: list[int] = []
        event_ids: list[Any] = []
        subjects: list[str] = []
        payloads: list[bytes] = []
        for n, fin in enumerate(batch, start=1):
            ticket_of += [n] * len(fin.tickets)
            tickets += fin.tickets
            if fin.entry is not None:
                line_of += [n] * len(fin.entry.lines)
                lines += fin.entry.lines
            ids, _, subj, pay = _own_outbox_rows(org_id, fin.events)
            event_of += [n] * len(ids)
            event_ids += ids
            subjects += subj
            payloads += pay
        # on the first saga's connection: it waits for this anyway, and a pool connection of
        # our own could be one that every waiting saga holds
        moved = await batch[0].session.conn.fetchval(
            "SELECT checkout_finish_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
            "$14, $15, $16, $17, $18, $19, $20, $21)",
            org_id, [f.checkout.checkout_id for f in batch], [f.charge_id for f in batch],
            [json.dumps(f.completion) for f in batch], [f.checkout.event_id for f in batch],
            [f.issued_at for f in batch],
            ticket_of, [code for code, _ in tickets], [i.ticket_type_id for _, i in tickets],
            [i.ticket_type for _, i in tickets],
            [f.entry.entry_id if f.entry is not None else None for f in batch],
            [f.entry.description if f.entry is not None else None for f in batch],
            line_of, [str(l.account) for l in lines], [str(l.side) for l in lines],
            [l.amount.amount for l in lines], [l.amount.currency for l in lines],
            event_of, event_ids, subjects, payloads,
        )  # fmt: skip
        outbox_committed(SERVICE_SCHEMA)
        return list(moved)

    async def _finish_one(self, f: _Finish) -> None:
        """One saga alone, with ``checkout_finish`` (which also lets go of its saga lock)."""
        session, checkout, entry, events = f.session, f.checkout, f.entry, f.events
        event_ids, _, subjects, payloads = _own_outbox_rows(checkout.organization_id, events)
        lines = entry.lines if entry is not None else ()
        done = await session.conn.fetchval(
            "SELECT checkout_finish($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, "
            "$14, $15, $16, $17, $18, $19, $20, $21)",
            checkout.organization_id, checkout.checkout_id, str(checkout.status), f.charge_id,
            f.completion, checkout.event_id, f.issued_at,
            [code for code, _ in f.tickets], [i.ticket_type_id for _, i in f.tickets],
            [i.ticket_type for _, i in f.tickets],
            entry.entry_id if entry is not None else None,
            entry.description if entry is not None else None, f.posted_at,
            [str(l.account) for l in lines], [str(l.side) for l in lines],
            [l.amount.amount for l in lines], [l.amount.currency for l in lines],
            event_ids, subjects, payloads,
            _saga_lock_key(checkout.checkout_id) if session.locked else None,
        )  # fmt: skip
        outbox_committed(SERVICE_SCHEMA)
        if not done:
            raise LostRace(f"checkout {checkout.checkout_id} is no longer {checkout.status}")
        session.locked = False  # let go of by the statement

    async def load_checkout(self, conn: asyncpg.Connection, checkout_id: UUID) -> CheckoutRecord | None:
        """A checkout of the current tenant with its holds, or None."""
        row = await conn.fetchrow(_CHECKOUT_SELECT + " WHERE c.id = $1", checkout_id)
        return None if row is None else _checkout(row)

    async def claim_for_refund(
        self, conn: asyncpg.Connection, checkout_id: UUID, actor: Actor, correlation_id: str,
        causation_id: str | None,
    ) -> bool:
        """completed -> refunding, recording who refunds it."""
        ensure_transition(CheckoutStatus.COMPLETED, CheckoutStatus.REFUNDING)
        done = await conn.fetchval(
            "UPDATE checkouts SET status = 'refunding', actor = $2, correlation_id = $3, "
            "causation_id = $4, updated_at = now() "
            "WHERE id = $1 AND status = 'completed' RETURNING 1",
            checkout_id, actor.model_dump(mode="json"), correlation_id, causation_id,
        )  # fmt: skip
        return done is not None

    async def move(
        self,
        conn: asyncpg.Connection,
        checkout: CheckoutRecord,
        new: CheckoutStatus,
        **fields: Any,
    ) -> None:
        """Move ``checkout`` from its current status to ``new`` (and set ``fields``), or raise
        ``LostRace`` if someone else moved it first."""
        ensure_transition(checkout.status, new)
        assignments = ["status = $3", "updated_at = now()"]
        values: list[Any] = []
        for i, (column, value) in enumerate(fields.items(), start=4):
            if column not in _MOVABLE_COLUMNS:
                raise ValueError(f"checkouts.{column} is not set by a saga step")
            assignments.append(f"{column} = ${i}")
            values.append(value)
        done = await conn.fetchval(
            f"UPDATE checkouts SET {', '.join(assignments)} "
            "WHERE id = $1 AND status = $2 RETURNING 1",
            checkout.checkout_id, str(checkout.status), str(new), *values,
        )  # fmt: skip
        if done is None:
            raise LostRace(f"checkout {checkout.checkout_id} is no longer {checkout.status}")

    async def release_holds(self, conn: asyncpg.Connection, checkout: CheckoutRecord) -> None:
        """Give the checkout's active holds back to the stock."""
        await conn.execute(
            "WITH released AS ("
            "  UPDATE holds SET state = 'released' "
            "  WHERE checkout_id = $1 AND state = 'active' "
            "  RETURNING ticket_type_id, quantity) "
            "UPDATE ticket_types t SET reserved = t.reserved - r.quantity "
            "FROM released r WHERE t.id = r.ticket_type_id",
            checkout.checkout_id,
        )

    async def post_sale(
        self, conn: asyncpg.Connection, checkout: CheckoutRecord, entry: JournalEntry | None,
        posted_at: datetime,
    ) -> None:
        """charged -> posted with the sale's journal entry, in one statement."""
        ensure_transition(checkout.status, CheckoutStatus.POSTED)
        if entry is None:  # nothing to book (a free checkout)
            await self.move(conn, checkout, CheckoutStatus.POSTED)
            return
        done = await conn.fetchval(
            "WITH moved AS ("
            "  UPDATE checkouts SET status = 'posted', updated_at = now() "
            "  WHERE id = $13 AND status = $14 RETURNING id), "
            + _ENTRY_CTE.rstrip(", ") +
            " SELECT count(*) FROM moved",
            *_entry_args(checkout.organization_id, entry, posted_at),
            checkout.checkout_id, str(checkout.status),
        )  # fmt: skip
        if done != 1:
            raise LostRace(f"checkout {checkout.checkout_id} is no longer {checkout.status}")

    async def issue_tickets(
        self,
        conn: asyncpg.Connection,
        checkout: CheckoutRecord,
        tickets: Sequence[tuple[str, HeldItem]],
        issued_at: datetime,
        completion: dict[str, Any],
    ) -> None:
        """posted -> completed: store the tickets and turn the holds into sales (one
        statement; the stock counter already counts them, so it is not touched)."""
        ensure_transition(checkout.status, CheckoutStatus.COMPLETED)
        done = await conn.fetchval(
            "WITH moved AS ("
            "  UPDATE checkouts SET status = 'completed', completion = $7, updated_at = now() "
            "  WHERE id = $3 AND status = $8 RETURNING id), "
            "issued AS ("
            "  INSERT INTO tickets (organization_id, code, event_id, ticket_type_id, ticket_type, "
            "  checkout_id, issued_at) "
            "  SELECT $1, t.code, $2, t.type_id, t.type_code, $3, $9 "
            "  FROM moved, unnest($4::text[], $5::uuid[], $6::text[]) AS t(code, type_id, type_code) "
            "  RETURNING 1), "
            "consumed AS ("
            "  UPDATE holds SET state = 'consumed' "
            "  WHERE checkout_id = (SELECT id FROM moved) AND state = 'active' RETURNING 1) "
            # (data-modifying CTEs always run to completion, read or not)
            "SELECT count(*) FROM moved",
            checkout.organization_id, checkout.event_id, checkout.checkout_id,
            [code for code, _ in tickets], [i.ticket_type_id for _, i in tickets],
            [i.ticket_type for _, i in tickets], completion, str(checkout.status), issued_at,
        )  # fmt: skip
        if done != 1:
            raise LostRace(f"checkout {checkout.checkout_id} is no longer {checkout.status}")

    async def tickets_of(self, conn: asyncpg.Connection, checkout_id: UUID) -> list[tuple[str, str, str]]:
        """(code, ticket type, status) of a checkout's tickets."""
        rows = await conn.fetch(
            "SELECT code, ticket_type, status FROM tickets WHERE checkout_id = $1 "
            "ORDER BY ticket_type, code",
            checkout_id,
        )
        return [(r["code"], r["ticket_type"], r["status"]) for r in rows]

    async def cancel_tickets(
        self, conn: asyncpg.Connection, checkout: CheckoutRecord, cancelled_at: datetime
    ) -> list[str]:
        """Cancel a checkout's tickets and put them back on sale; returns their codes."""
        rows = await conn.fetch(
            "WITH cancelled AS ("
            "  UPDATE tickets SET status = 'cancelled', cancelled_at = $2 "
            "  WHERE checkout_id = $1 AND status = 'issued' RETURNING code, ticket_type_id), "
            "restocked AS ("
            "  UPDATE ticket_types t SET reserved = t.reserved - c.n "
            "  FROM (SELECT ticket_type_id, count(*) AS n FROM cancelled GROUP BY 1) c "
            "  WHERE t.id = c.ticket_type_id RETURNING 1) "
            "SELECT code FROM cancelled ORDER BY code",
            checkout.checkout_id, cancelled_at,
        )  # fmt: skip
        return [r["code"] for r in rows]

    # -- ledger -----------------------------------------------------------------------------

    async def post(
        self, conn: asyncpg.Connection, org_id: UUID, entry: JournalEntry, posted_at: datetime
    ) -> None:
        """Insert a journal entry and its lines; the database checks the balance at commit."""
        await conn.execute(
            "WITH " + _ENTRY_CTE.rstrip(", ") + " SELECT 1",
            *_entry_args(org_id, entry, posted_at),
        )

    async def entry_for(
        self, conn: asyncpg.Connection, reference_type: ReferenceType, reference_id: UUID
    ) -> JournalEntry | None:
        """The entry recorded for a reference (at most one per type and reference)."""
        rows = await conn.fetch(
            "SELECT e.id, e.description, e.reverses_entry_id, l.account, l.side, l.amount, "
            "l.currency FROM journal_entries e "
            "JOIN journal_lines l ON l.organization_id = e.organization_id AND l.entry_id = e.id "
            "WHERE e.reference_type = $1 AND e.reference_id = $2 ORDER BY l.line_no",
            reference_type, reference_id,
        )  # fmt: skip
        if not rows:
            return None
        return JournalEntry(
            entry_id=rows[0]["id"],
            reference_type=reference_type,
            reference_id=reference_id,
            description=rows[0]["description"],
            reverses_entry_id=rows[0]["reverses_entry_id"],
            lines=tuple(
                JournalLine(r["account"], Side(r["side"]), Money(r["amount"], r["currency"]))
                for r in rows
            ),
        )

    async def balances(self, conn: asyncpg.Connection) -> list[tuple[str, str, int, int]]:
        """(account, currency, debit total, credit total) of every used account."""
        rows = await conn.fetch(
            "SELECT account, currency, "
            "coalesce(sum(amount) FILTER (WHERE side = 'debit'), 0) AS debit, "
            "coalesce(sum(amount) FILTER (WHERE side = 'credit'), 0) AS credit "
            "FROM journal_lines GROUP BY account, currency ORDER BY account, currency"
        )
        return [(r["account"], r["currency"], int(r["debit"]), int(r["credit"])) for r in rows]

    # -- background work --------------------------------------------------------------------

    @asynccontextmanager
    async def _work_scan(self) -> AsyncIterator[asyncpg.Connection]:
        # Finding due work spans tenants: a read-only transaction under the platform-read
        # policy (SELECT only). It returns ids; every change is made per tenant afterwards.
        async with self.pool.acquire() as conn:
            async with conn.transaction(readonly=True):
                await conn.execute("SELECT set_config('vge.platform_read', 'on', true)")
                yield conn

    async def due_expiries(self, limit: int) -> list[tuple[UUID, UUID]]:
        """(tenant, checkout) of pending checkouts whose holds have lapsed."""
        async with self._work_scan() as conn:
            rows = await conn.fetch(
                "SELECT organization_id, id FROM checkouts "
                "WHERE status = 'pending' AND expires_at <= now() ORDER BY expires_at LIMIT $1",
                limit,
            )
        return [(r["organization_id"], r["id"]) for r in rows]

    async def unfinished_sagas(self, idle_seconds: float, limit: int) -> list[tuple[UUID, UUID]]:
        """(tenant, checkout) of sagas in an unfinished state, untouched for ``idle_seconds``."""
        async with self._work_scan() as conn:
            rows = await conn.fetch(
                "SELECT organization_id, id FROM checkouts "
                "WHERE status IN ('charging', 'charged', 'posted', 'compensating', 'refunding') "
                "AND updated_at <= now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
                float(idle_seconds), limit,
            )  # fmt: skip
        return [(r["organization_id"], r["id"]) for r in rows]

    async def lock_expired(
        self, conn: asyncpg.Connection, checkout_ids: Iterable[UUID]
    ) -> list[CheckoutRecord]:
        """Lock the still-pending, lapsed checkouts among ``checkout_ids``; rows another
        replica is already expiring (or a buyer is completing) are skipped, not waited for."""
        rows = await conn.fetch(
            _CHECKOUT_SELECT + " WHERE c.id = ANY($1::uuid[]) AND c.status = 'pending' "
            "AND c.expires_at <= now() FOR UPDATE OF c SKIP LOCKED",
            list(checkout_ids),
        )
        return [_checkout(r) for r in rows]

    async def seconds_since_update(self, conn: asyncpg.Connection, checkout_id: UUID) -> float:
        """How long ago the checkout last changed (database clock)."""
        return float(
            await conn.fetchval(
                "SELECT extract(epoch FROM now() - updated_at) FROM checkouts WHERE id = $1",
                checkout_id,
            )
        )


_CREATE_BATCH = 64


@dataclass(slots=True)
class _NewCheckout:
    """A checkout waiting to be created with the tenant's others."""

    checkout_id: UUID
    event_id: UUID
    customer_email: str
    total: Money
    expires_at: datetime
    items: tuple[HeldItem, ...]
    create_key: str | None
    outbox: tuple[list[Any], list[Any], list[str], list[bytes]]


_FINISH_BATCH = 64


@dataclass(slots=True)
class _Finish:
    """A saga waiting to be finished with the tenant's others."""

    session: SagaSession
    checkout: CheckoutRecord
    charge_id: str | None
    entry: JournalEntry | None
    posted_at: datetime
    tickets: Sequence[tuple[str, HeldItem]]
    issued_at: datetime
    completion: dict[str, Any]
    events: tuple[Envelope, ...]


def _own_outbox_rows(org_id: UUID, events: Sequence[Envelope]) -> tuple[list[Any], list[Any], list[str], list[bytes]]:
    """``outbox_rows`` of events that all belong to ``org_id`` (the functions insert them as
    that tenant's)."""
    rows = outbox_rows(SERVICE_SCHEMA, events)
    if any(org != org_id for org in rows[1]):
        raise ValueError("an event of another tenant")
    return rows


# An entry and its lines as CTE clauses, parameters $1..$12 (``_entry_args``); a caller's own
# parameters start at $13. The balance is checked by the deferred constraint triggers at COMMIT.
_ENTRY_CTE = (
    "entry AS ("
    "  INSERT INTO journal_entries (organization_id, id, reference_type, reference_id, "
    "  reverses_entry_id, description, posted_at) "
    "  VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id), "
    "lines AS ("
    "  INSERT INTO journal_lines (organization_id, entry_id, line_no, account, side, amount, currency) "
    "  SELECT $1, entry.id, l.n, l.account, l.side, l.amount, l.currency "
    "  FROM entry, unnest($8::smallint[], $9::text[], $10::text[], $11::bigint[], $12::text[]) "
    "  AS l(n, account, side, amount, currency) RETURNING 1), "
)


def _entry_args(org_id: UUID, entry: JournalEntry, posted_at: datetime) -> list[Any]:
    """Parameters $1..$12 of ``_ENTRY_CTE``."""
    lines = entry.lines
    return [org_id, entry.entry_id, entry.reference_type, entry.reference_id,
            entry.reverses_entry_id, entry.description, posted_at,
            list(range(1, len(lines) + 1)), [str(l.account) for l in lines],
            [str(l.side) for l in lines], [l.amount.amount for l in lines],
            [l.amount.currency for l in lines]]  # fmt: skip


_MOVABLE_COLUMNS = frozenset(
    {"charge_id", "refund_id", "failure_reason", "completion", "refund"}
)
