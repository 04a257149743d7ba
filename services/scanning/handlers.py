"""Scanning's handlers: thin glue from commands and events to the tiers and the authority."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter

from libs.context import CommandContext
from libs.contracts.catalog import TicketCancelled
from libs.contracts.scanning import (
    Direction,
    GetOccupancy,
    OccupancyCount,
    Occupancy,
    OfflineScanDecision,
    OfflineScansSynced,
    ScanDecision,
    ScanOutcome,
    ScanTicket,
    SyncOfflineScans,
)
from libs.envelope import Envelope, utcnow
from libs.batching import BackgroundBatches
from libs.errors import InvalidInput, NotFound
from libs.log import get_logger
from libs.policy import Action, Resource, authorize
from services.scanning.adapters.batching import DecisionBatcher
from services.scanning.adapters.postgres import ScanningStore
from services.scanning.adapters.redis_claims import AdmissionClaims
from services.scanning.domain import Admission, AdmissionCache, duplicate_of, offline_apply_order
from services.scanning.metrics import count_decisions

__all__ = ["AccessControl", "REGISTRY_CONSUMER"]

log = get_logger(__name__)

REGISTRY_CONSUMER = "scanning-registry"
# Tier-2 reads and claims wait this long to go to Redis together (one MGET, one write), since a
# command per scan or per batch was ~7% (claims) and ~9% (reads) of the service's time at 1,000
# scans/s. Neither is waited for by a scan: the authority decides every scan. A claim lands that
# much later, and a re-scan meanwhile goes to the authority, which rejects it (a re-scan at
# another gate takes seconds); a read's answer mostly comes after its own scan was decided, and
# serves the next scans of the ticket (a duplicate is a re-scan, seconds or minutes later).
# 50 ms, not 10: at 10 ms the two kinds of Redis call still took ~8% of the service's time at
# 1,000 scans/s (py-spy). bench/bench_scan.py, 3 pairs: service CPU per scan at 1,000/s
# 632-648 -> 599-619 us, flat out 336-371 -> 330-347 us (a slow VM day).
TIER2_LINGER_SECONDS = 0.05
# An upload's bookkeeping is done a part at a time as the parts are decided, and its scans are
# made ready with a pause every this many: 10,000 scans made ready in one go, and remembered and
# answered in one go at the end, held the event loop ~60 and ~190 ms, and every gate's scan
# arriving meanwhile waited for all of it.
UPLOAD_STEP = 1_000
_OFFLINE_DECISIONS = TypeAdapter(list[OfflineScanDecision])


def _tenant(ctx: CommandContext) -> UUID:
    if ctx.org_id is None:
        raise InvalidInput("scanning acts inside one tenant: the context names none")
    return ctx.org_id


class AccessControl:
    """Admits and lets out ticket holders at the gates, and counts who is inside."""

    def __init__(self, store: ScanningStore, claims: AdmissionClaims, cache: AdmissionCache | None = None,
                 *, tier2_linger: float = TIER2_LINGER_SECONDS):
        self.store = store
        self.claims = claims
        self.cache = cache or AdmissionCache()
        self.batcher = DecisionBatcher(self._decide_batch)
        # tier 2 is read as scans arrive, in the background, into tier 1 (see scan)
        self._lookups: BackgroundBatches[tuple[UUID, str]] = BackgroundBatches(
            "admission_lookups", self._look_up, linger=tier2_linger)
        # tier 2 is written in the background (see _remember)
        self._claims: BackgroundBatches[tuple[bool, UUID, str, Admission]] = BackgroundBatches(
            "admission_claims", self._claim, linger=tier2_linger)

    async def scan(self, ctx: CommandContext, cmd: ScanTicket) -> ScanDecision:
        """Decide one online scan: tier 1 (this process), tier 2 (Redis), then the authority."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.SCAN_SUBMIT, Resource("event", org, str(cmd.event_id)))
        nonce = cmd.nonce or f"srv-{uuid.uuid4()}"
        item = self._scan_item(ctx, str(cmd.event_id), cmd.ticket_code, cmd.direction, cmd.gate,
                               cmd.zone, nonce, cmd.scanned_at, cmd.device_event_id)
        if cmd.direction is Direction.ENTRY:
            self._mark_if_duplicate(item, self.cache.get(org, cmd.ticket_code))  # tier 1
            if "pre" not in item:
                # tier 2, read into tier 1 with the scans arriving within TIER2_LINGER_SECONDS
                # (see _decide_batch)
                self._lookups.add(((org, cmd.ticket_code),))
        decision = await self.batcher.submit(org, item)
        return ScanDecision(
            result=decision["result"], reason=decision["reason"], scan_id=decision["scan_id"],
            ticket_type=decision["ticket_type"], first_admitted_at=decision["first_at"],
            first_gate=decision["first_gate"], nonce=nonce, conflict=decision["conflict"],
            replayed=decision["replayed"],
        )

    async def sync(self, ctx: CommandContext, cmd: SyncOfflineScans) -> OfflineScansSynced:
        """Apply an offline batch in ``scanned_at`` order (in parts split by ticket, each a
        transaction: ``ScanningStore.decide_upload``); one result per scan."""
        org = _tenant(ctx)
        event_ids = {e: str(e) for e in {s.event_id for s in cmd.scans}}
        for event_id in event_ids.values():
            authorize(ctx.actor, Action.SCAN_SYNC, Resource("event", org, event_id))
        order = offline_apply_order(cmd.scans)
        actor = ctx.actor.model_dump(mode="json")
        items = []
        for n, i in enumerate(order):
            if n % UPLOAD_STEP == 0:
                await asyncio.sleep(0)  # the gates' scans go on meanwhile (see UPLOAD_STEP)
            s = cmd.scans[i]
            item = self._scan_item(ctx, event_ids[s.event_id], s.ticket_code, s.direction, s.gate,
                                   s.zone, s.nonce, s.scanned_at, cmd.device_event_id, actor)
            item.update(offline=True, device_result=s.device_result, i=i)
            items.append(item)
        results: list[OfflineScanDecision | None] = [None] * len(cmd.scans)
        claims: list[tuple[bool, UUID, str, Admission]] = []

        def decided(part: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> None:
            count_decisions(decisions, "offline")
            by_index = {d["i"]: d for d in decisions}
            # tier 1 at once, before the reply: an upload can move a ticket's first admission to
            # an earlier gate, and a gate scanning it next must not be told the old one. Tier 2
            # once the upload is decided (below), where a late write is harmless: the moved
            # admission overwrites.
            self._remember([(org, item, by_index[item["i"]]) for item in part], later=claims)
            # one validation per part (in pydantic's core), not one model call per scan
            for d, result in zip(decisions, _OFFLINE_DECISIONS.validate_python([
                {"nonce": cmd.scans[d["i"]].nonce, "result": d["result"], "reason": d["reason"],
                 "conflict": d["conflict"], "scan_id": d["scan_id"], "ticket_type": d["ticket_type"],
                 "first_admitted_at": d["first_at"], "first_gate": d["first_gate"], "replayed": d["replayed"]}
                for d in decisions
            ])):
                results[d["i"]] = result

        try:
            await self.store.decide_upload(org, utcnow(), items, decided)
        finally:
            # Redis after the parts, not beside them: 10,000 claims are ~0.1 s of this loop's
            # time (py-spy), which the parts waited for. bench/bench_scan.py, 8 pairs: the
            # upload took 0.98-1.41 s (mean 1.18) with them beside, 0.98-1.27 s (mean 1.08) now.
            self._claims.add(claims)
        if any(result is None for result in results):
            raise RuntimeError("an offline scan of the upload got no decision")
        # (each result was validated with its part)
        return OfflineScansSynced.model_construct(results=results)

    async def occupancy(self, ctx: CommandContext, cmd: GetOccupancy) -> Occupancy:
        """The current occupancy of an event of the caller's tenant."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.OCCUPANCY_READ, Resource("event", org, str(cmd.event_id)))
        row = await self.store.occupancy(org, cmd.event_id)
        if row is None:
            raise NotFound("event not found")
        counts = row.pop("counts")
        return Occupancy(
            **row,
            by_gate=[OccupancyCount(key=c["key"], entries=c["entries"], exits=c["exits"])
                     for c in counts if c["dimension"] == "gate"],
            by_ticket_type=[OccupancyCount(key=c["key"], entries=c["entries"], exits=c["exits"],
                                           inside=c["entries"] - c["exits"])
                            for c in counts if c["dimension"] == "ticket_type"],
        )

    async def apply_catalog_event(self, envelope: Envelope) -> None:
        """Keep the ticket registry in step with payments' events (applied once each)."""
        applied = await self.store.apply_catalog_event(REGISTRY_CONSUMER, envelope)
        if applied and envelope.type == TicketCancelled.event_type:
            code = envelope.data["ticket_code"]
            self.cache.forget(envelope.org_id, code)
            await self.claims.release(envelope.org_id, code)

    async def apply_catalog_events(self, envelopes: list[Envelope]) -> None:
        """The same for a batch of events: one transaction per tenant."""
        for e in await self.store.apply_catalog_events(REGISTRY_CONSUMER, envelopes):
            if e.type == TicketCancelled.event_type:
                code = e.data["ticket_code"]
                self.cache.forget(e.org_id, code)
                await self.claims.release(e.org_id, code)

    # -- internals ----------------------------------------------------------------------------

    async def _decide_batch(self, org: UUID, now: datetime, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One batch of online scans: tier 1 again for the entries it did not settle on
        arrival (it now holds what tier 2 answered since, and this process's admissions since),
        then the authority (one PostgreSQL round trip), then feed both tiers.

        Tier 2's answer is used if it is in, never waited for: a Redis read as a step of the
        batch was ~0.6 of its 2.5 ms at 1,000 scans/s, and only saves the authority a ticket
        lock (it decides every scan anyway). With bench/bench_scan.py at 1,000/s, reading on
        arrival instead gave p50 5.0 -> 4.0 ms, p99 9.5 -> 8.6 ms; gathering the reads of
        10 ms into one MGET (TIER2_LINGER_SECONDS) then p50 6.3 -> 5.0 ms, p99 13.7 -> 11.8 ms
        (slow VM spell, 3 pairs)."""
        for it in items:
            if it["dir"] == "entry" and "pre" not in it:
                self._mark_if_duplicate(it, self.cache.get(org, it["code"]))
        decisions = await self.store.decide(org, now, items)
        count_decisions(decisions, "online")
        by_index = {d["i"]: d for d in decisions}
        self._remember([(org, it, by_index[it["i"]]) for it in items])
        return decisions

    async def _look_up(self, keys: list[tuple[UUID, str]]) -> None:
        # the scans that arrived together: one MGET (Redis down: all None, see AdmissionClaims).
        # What Redis knows goes into tier 1, where a cancellation that overtook it is still
        # caught: the authority checks a known duplicate's ticket for a cancellation.
        for (org, code), admission in zip(keys, await self.claims.admissions(keys)):
            if admission is not None:
                self.cache.put(org, code, admission)

    @staticmethod
    def _mark_if_duplicate(item: dict[str, Any], known: Admission | None) -> None:
        if known is None:
            return  # (the usual case, checked twice per entry: no parsing for it)
        dup = duplicate_of(known, event_id=UUID(item["event_id"]), direction=Direction(item["dir"]),
                           device_id=item["device"], nonce=item["nonce"])
        if dup is not None:
            # a known duplicate: still recorded by the authority, without taking the ticket lock
            item.update(pre="already_admitted", pre_first_at=dup.first_admitted_at.isoformat(),
                        pre_first_gate=dup.first_gate, pre_ticket_type=dup.ticket_type)

    @staticmethod
    def _scan_item(
        ctx: CommandContext, event_id: str, code: str, direction: Direction,
        gate: str | None, zone: str | None, nonce: str, scanned_at: datetime | None,
        device_event_id: UUID | None, actor: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        # ``actor``: the context's actor as JSON, when the caller has it already (a batch of
        # 10,000 offline scans has one actor). ``direction`` goes in as is: a StrEnum member is
        # the string itself (``.value`` costs a descriptor call, 10,000 times per upload).
        return {
            "event_id": event_id, "code": code, "dir": direction, "gate": gate,
            "zone": zone, "device": ctx.actor.user_id, "nonce": nonce,
            "scanned_at": scanned_at.isoformat() if scanned_at else None, "offline": False,
            "device_event_id": str(device_event_id) if device_event_id else None,
            "actor": actor if actor is not None else ctx.actor.model_dump(mode="json"),
            "corr": ctx.correlation_id,
        }

    def _remember(self, decided: list[tuple[UUID, dict[str, Any], dict[str, Any]]],
                  later: list[tuple[bool, UUID, str, Admission]] | None = None) -> None:
        """Feed tiers 1 and 2 with the admissions the authority just made, for events without
        re-entry, where an admission is final. Only from accepted scans: their device and nonce
        are known, so the admitting device's own retry still gets its "accepted" back.
        ``later``: tier 2's claims go there, for the caller to hand to ``self._claims`` once it
        is done (an upload, see ``sync``), not now.

        Tier 2 is written in the background, after the replies: it only saves the authority
        work on later scans, so the scans decided now need not wait for it (a claim that
        never lands costs a lookup, never a wrong decision). One write at a time, each after
        ``TIER2_LINGER_SECONDS``: what is decided meanwhile goes in the next one, so Redis sees
        a write per ~10 ms under load, not one per batch of scans (at 1,000 scans/s batches
        are two or three scans)."""
        claims: list[tuple[bool, UUID, str, Admission]] = []  # (moved, org, code, admission)
        event_ids: dict[str, UUID] = {}  # an upload names a few events 10,000 times
        for org, item, d in decided:
            if (
                item["dir"] != "entry"
                or d["result"] != ScanOutcome.ACCEPTED.value
                or d.get("reentry") is not False
                or d["replayed"]
            ):
                continue
            event_id = event_ids.get(item["event_id"])
            if event_id is None:
                event_id = event_ids[item["event_id"]] = UUID(item["event_id"])
            admission = Admission(
                event_id=event_id, ticket_type=d["ticket_type"],
                first_admitted_at=datetime.fromisoformat(d["first_at"]),
                first_gate=d["first_gate"], device_id=item["device"], nonce=item["nonce"],
            )
            self.cache.put(org, item["code"], admission, replace=d["swap"])
            claims.append((d["swap"], org, item["code"], admission))
        if later is None:
            self._claims.add(claims)
        else:
            later.extend(claims)

    async def _claim(self, claims: list[tuple[bool, UUID, str, Admission]]) -> None:
        # (Redis down is handled inside ``claim``; anything else is logged by BackgroundBatches)
        await self.claims.claim([(org, code, a) for moved, org, code, a in claims if not moved],
                                [(org, code, a) for moved, org, code, a in claims if moved])

    async def drain(self) -> None:
        """Finish the batches and tier-2 reads and writes under way (shutdown)."""
        await self.batcher.drain()
        await self._lookups.drain()
        await self._claims.drain()
