"""Scanning's PostgreSQL adapter: the authority's decisions, the ticket registry, occupancy."""

from __future__ import annotations

import asyncio
import zlib
from datetime import datetime, timedelta
from typing import Any, Callable
from uuid import UUID

import asyncpg

from libs.contracts.catalog import EventCreated, TicketCancelled, TicketIssued
from libs.db import CONNECTION_ERRORS, mark_processed, tenant_transaction
from libs.envelope import Envelope
from libs.errors import Unavailable
from libs.outbox import outbox_committed

__all__ = ["ScanningStore", "UPLOAD_PART", "OCCUPANCY_LIMIT", "OCCUPANCY_READS"]

SCHEMA = "scanning"
# An offline upload is decided in parts of about this many scans, each its own transaction
# (decide_upload). Why parts, not one or two transactions: the outbox relay publishes in commit
# order and holds back every event committed after a transaction still open began
# (libs/outbox.py), so a 10,000-scan upload as two ~1-s transactions held back the gates' scan
# events and the dashboards' occupancy.changed, every tenant's, for as long. With gates scanning
# at 500/s meanwhile (bench/bench_scan.py --offline-gates 500), their events came 0.9-1.2 s after
# their answers (p50), 1.8-1.9 s (p99); in parts of 250: 43-57 ms, 107-243 ms (of 500: ~100 ms,
# ~210 ms; of 1,000: ~200 ms, ~350 ms). The cost: the upload alone took 0.93-1.83 s in 12 runs,
# against 0.77-1.17 s in two transactions; its parts take PostgreSQL ~1.9 s in all against ~1.15 s
# (a part alone costs per scan what a big one does: bench_decide.py, 84 against 80 us).
UPLOAD_PART = 250
OCCUPANCY_LIMIT = 100  # events whose occupancy.changed is queued per call

# An event's occupancy, as GetOccupancy reads it. The tenant is named here although row-level
# security adds it: the policies' condition is "this tenant OR a platform read", which is no index
# condition, so by event id alone each read walked the whole key index, every tenant's rows.
OCCUPANCY_READS = {
    "capacity": "SELECT capacity FROM events WHERE organization_id = $1 AND event_id = $2",
    "totals": "SELECT inside, entries, exits, updated_at FROM occupancy "
              "WHERE organization_id = $1 AND event_id = $2",
    "counts": "SELECT dimension, key, entries, exits FROM occupancy_counts "
              "WHERE organization_id = $1 AND event_id = $2 ORDER BY dimension, key",
}

_REGISTRY_EVENTS = {EventCreated.event_type, TicketIssued.event_type, TicketCancelled.event_type}
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


class ScanningStore:
    """All of scanning's SQL. Every call that commits outbox rows wakes the process's relay
    right after (``outbox_committed``): the rows are written by SQL functions, and scanning's
    outbox has no trigger at all (migration 0004)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # set once scans were admitted or let out here: the occupancy publisher's wake-up
        self.occupancy_changed = asyncio.Event()
        self._online_in_flight = 0  # gates' batches being decided (decide_upload gives way to them)

    async def decide(self, org_id: UUID, now: datetime, scans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decide, record and apply a batch of one tenant's online scans in one statement (one
        transaction, one round trip). Raises ``Unavailable`` when PostgreSQL does not answer."""
        self._online_in_flight += 1
        try:
            return await self._decide(org_id, now, scans)
        finally:
            self._online_in_flight -= 1

    async def decide_upload(self, org_id: UUID, now: datetime, scans: list[dict[str, Any]],
                            decided: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None]) -> None:
        """Decide an offline upload in parts of about ``UPLOAD_PART`` scans split by ticket,
        each its own transaction (see ``UPLOAD_PART`` for why), and hand each part with its
        decisions to ``decided(part, decisions)`` as it commits. A decision depends only on its
        own ticket's earlier scans, which stay together and in order.

        Two parts at a time (PostgreSQL on both cores) while no gate's scan is being decided;
        from the first one seen, one at a time to the end: the gates' answers come first. (Four
        gates scanning in a loop during a 10,000-scan upload waited p90 ~45 ms with two parts at
        once, ~20 ms with one. The upload takes longer then: ``bench_scan.py --offline-gates 500``,
        1.6-2.5 s.)

        Each part commits on its own; if one fails, no further part starts, the device uploads
        again, and the parts already committed are replayed, not applied twice (every scan is
        idempotent per device and nonce). A part under way beside the failed one ends, and is
        handed over, before the failure is raised: nothing of the upload goes on after its
        answer."""
        parts: list[list[dict[str, Any]]] = [[] for _ in range(-(-len(scans) // UPLOAD_PART))]
        for scan in scans:
            parts[zlib.crc32(scan["code"].encode()) % len(parts)].append(scan)
        waiting = [part for part in reversed(parts) if part]
        failed = False

        async def lane(second: bool) -> None:
            nonlocal failed
            while waiting and not failed and not (second and self._online_in_flight):
                part = waiting.pop()
                try:
                    decided(part, await self._decide(org_id, now, part))
                except BaseException:
                    failed = True
                    raise

        for outcome in await asyncio.gather(lane(False), lane(True), return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _decide(self, org_id: UUID, now: datetime, scans: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for attempt in range(3):
            try:
                async with self._pool.acquire(timeout=2.0) as conn:
                    # one JSON array, not a row per scan: one decode for the whole batch
                    decisions = await conn.fetchval(
                        "SELECT coalesce(jsonb_agg(d), '[]') FROM decide_scans($1, $2, $3) d", org_id, now, scans
                    )
                outbox_committed(SCHEMA)  # every scan has its event
                if any(d["result"] == "accepted" for d in decisions):
                    self.occupancy_changed.set()
                return decisions
            except _RETRYABLE:
                # cannot happen between our own batches (tickets are locked in code order), but a
                # retry is the right answer to any serialization failure
                await asyncio.sleep(0.01 * (attempt + 1))
            except CONNECTION_ERRORS as exc:
                raise Unavailable("scan authority (PostgreSQL) unavailable") from exc
        raise Unavailable("scan authority busy; retry")

    async def occupancy(self, org_id: UUID, event_id: UUID) -> dict[str, Any] | None:
        """Current occupancy of an event, or None if this tenant has no such event."""
        try:
            async with tenant_transaction(self._pool, org_id, readonly=True) as conn:
                ev = await conn.fetchrow(OCCUPANCY_READS["capacity"], org_id, event_id)
                occ = await conn.fetchrow(OCCUPANCY_READS["totals"], org_id, event_id)
                if ev is None and occ is None:
                    return None
                counts = await conn.fetch(OCCUPANCY_READS["counts"], org_id, event_id)
        except CONNECTION_ERRORS as exc:
            raise Unavailable("occupancy store unavailable") from exc
        return {
            "event_id": event_id,
            "capacity": ev["capacity"] if ev else None,
            "inside": occ["inside"] if occ else 0,
            "entries": occ["entries"] if occ else 0,
            "exits": occ["exits"] if occ else 0,
            "updated_at": occ["updated_at"] if occ else None,
            "counts": [dict(r) for r in counts],
        }

    async def publish_occupancy_changes(self, limit: int = OCCUPANCY_LIMIT) -> int:
        """Queue one ``occupancy.changed`` per event whose occupancy changed (coalesced), for at
        most ``limit`` events; returns how many. The relay publishes them at once, not at its next
        turn (up to 50 ms later, ``OutboxRelay``'s ``min_pass_interval``): dashboards wait for
        them, and they come a few a second per event, not one per scan."""
        async with self._pool.acquire(timeout=2.0) as conn:
            queued = await conn.fetchval("SELECT publish_occupancy_changes($1)", limit)
        if queued:
            outbox_committed(SCHEMA, urgent=True)
        return queued

    # -- the ticket registry (fed by payments' events) --------------------------------------------

    async def apply_catalog_event(self, consumer: str, envelope: Envelope) -> bool:
        """Apply one payments event to the registry, once; False if it was already applied or
        is not a registry event."""
        if envelope.type not in _REGISTRY_EVENTS:
            return False
        async with tenant_transaction(self._pool, envelope.org_id) as conn:
            if not await mark_processed(conn, consumer, envelope.event_id):
                return False
            if envelope.type == EventCreated.event_type:
                await self._event_created(conn, envelope.org_id, EventCreated.from_envelope(envelope))
            elif envelope.type == TicketIssued.event_type:
                await self._ticket_issued(conn, envelope.org_id, TicketIssued.from_envelope(envelope))
            elif envelope.type == TicketCancelled.event_type:
                await self._ticket_cancelled(conn, envelope.org_id, TicketCancelled.from_envelope(envelope))
        return True

    async def apply_catalog_events(self, consumer: str, envelopes: list[Envelope]) -> list[Envelope]:
        """Apply a batch of payments events in one transaction per tenant (a sale of thousands
        of tickets is thousands of events); returns the ones applied now. The order inside a
        batch does not matter: an issue never revives a cancelled ticket."""
        relevant: dict[UUID, list[Envelope]] = {}
        for e in envelopes:
            if e.type in _REGISTRY_EVENTS:
                relevant.setdefault(e.org_id, []).append(e)
        applied: list[Envelope] = []
        for org, events in relevant.items():
            async with tenant_transaction(self._pool, org) as conn:
                fresh_ids = {
                    r["event_id"]
                    for r in await conn.fetch(
                        "INSERT INTO processed_events (consumer, event_id) "
                        "SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id",
                        consumer, [e.event_id for e in events],
                    )
                }
                fresh = [e for e in events if e.event_id in fresh_ids]
                for e in fresh:
                    if e.type == EventCreated.event_type:
                        await self._event_created(conn, org, EventCreated.from_envelope(e))
                issued = [TicketIssued.from_envelope(e) for e in fresh if e.type == TicketIssued.event_type]
                if issued:
                    await conn.execute(
                        "INSERT INTO tickets (organization_id, ticket_code, event_id, ticket_type, issued_at) "
                        "SELECT $1, * FROM unnest($2::text[], $3::uuid[], $4::text[], $5::timestamptz[]) "
                        "ON CONFLICT (organization_id, ticket_code) DO UPDATE SET "
                        "ticket_type = excluded.ticket_type, issued_at = excluded.issued_at "
                        "WHERE tickets.ticket_type = ''",
                        org, [t.ticket_code for t in issued], [t.event_id for t in issued],
                        [t.ticket_type for t in issued], [t.issued_at for t in issued],
                    )
                for e in fresh:
                    if e.type == TicketCancelled.event_type:
                        await self._ticket_cancelled(conn, org, TicketCancelled.from_envelope(e))
            applied += fresh
        return applied

    @staticmethod
    async def _event_created(conn: asyncpg.Connection, org: UUID, e: EventCreated) -> None:
        valid_from = e.valid_from or (e.starts_at - timedelta(hours=6))
        valid_until = e.valid_until or e.ends_at
        await conn.execute(
            "INSERT INTO events (organization_id, event_id, name, capacity, reentry_allowed, "
            "valid_from, valid_until, zones) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
            "ON CONFLICT (organization_id, event_id) DO UPDATE SET name = excluded.name, "
            "capacity = excluded.capacity, reentry_allowed = excluded.reentry_allowed, "
            "valid_from = excluded.valid_from, valid_until = excluded.valid_until, zones = excluded.zones",
            org, e.event_id, e.name, e.capacity, e.reentry_allowed, valid_from, valid_until, e.zones,
        )
        if e.ticket_types:
            await conn.executemany(
                "INSERT INTO ticket_types (organization_id, event_id, code, name, zones) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (organization_id, event_id, code) "
                "DO UPDATE SET name = excluded.name, zones = excluded.zones",
                [(org, e.event_id, t.code, t.name, t.zones) for t in e.ticket_types],
            )

    @staticmethod
    async def _ticket_issued(conn: asyncpg.Connection, org: UUID, t: TicketIssued) -> None:
        # DO NOTHING: a cancellation that overtook the issue keeps the ticket cancelled
        await conn.execute(
            "INSERT INTO tickets (organization_id, ticket_code, event_id, ticket_type, issued_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (organization_id, ticket_code) DO "
            "UPDATE SET ticket_type = excluded.ticket_type, issued_at = excluded.issued_at "
            "WHERE tickets.ticket_type = ''",
            org, t.ticket_code, t.event_id, t.ticket_type, t.issued_at,
        )

    @staticmethod
    async def _ticket_cancelled(conn: asyncpg.Connection, org: UUID, t: TicketCancelled) -> None:
        await conn.execute(
            "INSERT INTO tickets (organization_id, ticket_code, event_id, ticket_type, status, cancelled_at) "
            "VALUES ($1, $2, $3, '', 'cancelled', $4) ON CONFLICT (organization_id, ticket_code) "
            "DO UPDATE SET status = 'cancelled', cancelled_at = excluded.cancelled_at",
            org, t.ticket_code, t.event_id, t.cancelled_at,
        )
