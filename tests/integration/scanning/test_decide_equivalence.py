"""The set-based authority (migration 0003's ``decide_scans``) decides exactly as the ordered
loop it replaced (``decide_scans_sequential``).

Two tenants start from the same registry; random batches (online and offline, entries and
exits, duplicates inside a batch, retried nonces, cache-known duplicates, cancelled, unknown,
wrong-event and zone-denied tickets, offline admissions earlier than the recorded one) go
through one function each. Every decision, every stored scan, every ticket's state, occupancy
and every outbox event must come out the same.
"""

from __future__ import annotations

import json
from collections import Counter
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from libs.migrations import migrate
from services.scanning.bootstrap import MIGRATIONS

pytestmark = pytest.mark.integration

GATES = ["A", "B", "C"]
ZONES = [None, None, "vip", "ga"]


@pytest.fixture
async def authority(admin_dsn, platform_settings):
    """A connection acting as the scanning service's login role (row-level security applies)."""
    await migrate(admin_dsn, "scanning", MIGRATIONS, role_password=platform_settings.db_role_password)
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute("SET ROLE vge_scanning; SET search_path = scanning, vge")
    try:
        yield conn
    finally:
        await conn.close()


async def _registry(admin: asyncpg.Connection, org: uuid.UUID, ev: uuid.UUID, other_ev: uuid.UUID,
                    codes: list[str], reentry: bool, now: datetime) -> None:
    await admin.execute(
        "INSERT INTO scanning.events (organization_id, event_id, name, capacity, reentry_allowed, "
        "valid_from, valid_until, zones) VALUES ($1, $2, 'Main', 100, $3, $4, $5, '{vip,ga}'), "
        "($1, $6, 'Other', 100, false, $4, $5, '{}')",
        org, ev, reentry, now - timedelta(hours=2), now + timedelta(hours=5), other_ev)
    await admin.execute(
        "INSERT INTO scanning.ticket_types (organization_id, event_id, code, name, zones) VALUES "
        "($1, $2, 'GA', 'GA', '{}'), ($1, $2, 'VIP', 'VIP', '{vip}')", org, ev)
    main, other = codes[:-2], codes[-2:]
    await admin.execute(
        "INSERT INTO scanning.tickets (organization_id, ticket_code, event_id, ticket_type) "
        "SELECT $1, c, $2, CASE WHEN n % 3 = 0 THEN 'VIP' ELSE 'GA' END "
        "FROM unnest($3::text[]) WITH ORDINALITY AS u(c, n)", org, ev, main)
    await admin.execute(
        "INSERT INTO scanning.tickets (organization_id, ticket_code, event_id, ticket_type) "
        "SELECT $1, c, $2, 'GA' FROM unnest($3::text[]) c", org, other_ev, other)


def _batch(rng: random.Random, n: int, *, codes: list[str], ev: str, other_ev: str, now: datetime,
           used: list[tuple[str, str]], offline: bool) -> list[dict[str, Any]]:
    scans = []
    for i in range(rng.randint(1, 30)):
        device = f"dev-{rng.randint(1, 3)}"
        if used and rng.random() < 0.1:
            device, nonce = rng.choice(used)  # a retry of an earlier scan
        else:
            nonce = uuid.UUID(int=rng.getrandbits(128)).hex
            used.append((device, nonce))
        code = rng.choice(codes + ["TKT-unknown"]) if rng.random() < 0.95 else rng.choice(codes[:3])
        scan = {
            "event_id": ev if rng.random() < 0.9 else other_ev, "code": code,
            "dir": "entry" if rng.random() < 0.7 else "exit", "gate": rng.choice(GATES),
            "zone": rng.choice(ZONES), "device": device, "nonce": nonce, "scanned_at": None,
            "offline": offline,
            "device_event_id": rng.choice([None, None, None, ev, other_ev]),
            "actor": {"user_id": device, "type": "device"}, "corr": f"corr-{n}-{i}",
        }
        if offline:
            when = now - timedelta(seconds=rng.randint(0, 3 * 3600))
            scan.update(scanned_at=when.isoformat(),
                        device_result="accepted" if rng.random() < 0.8 else "rejected")
        elif scan["dir"] == "entry" and rng.random() < 0.1:
            scan.update(pre="already_admitted", pre_first_at=(now - timedelta(minutes=5)).isoformat(),
                        pre_first_gate=rng.choice(GATES), pre_ticket_type="GA")
        scans.append(scan)
    if offline:
        scans.sort(key=lambda s: s["scanned_at"])
    for i, s in enumerate(scans):
        s["i"] = i
    return scans


async def _decide(conn: asyncpg.Connection, function: str, org: uuid.UUID, now: datetime,
                  scans: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    rows = await conn.fetch(f"SELECT d::text FROM {function}($1, $2, $3::jsonb) d", org, now, json.dumps(scans))
    out = {}
    for r in rows:
        d = json.loads(r[0])
        d.pop("scan_id")
        out[d.pop("i")] = d
    return out


async def _state(admin: asyncpg.Connection, org: uuid.UUID) -> dict[str, Any]:
    """Everything the authority wrote for ``org``, without generated ids and the tenant id."""
    scans = [dict(r) for r in await admin.fetch(
        "SELECT scan_id, event_id, ticket_code, ticket_type, direction, gate, zone, device_id, nonce, "
        "result, reason, conflict, offline, first_admitted_at, first_gate, admission_no, scanned_at, "
        "received_at FROM scanning.scans WHERE organization_id = $1", org)]
    name = {s.pop("scan_id"): (s["device_id"], s["nonce"]) for s in scans}
    tickets = [dict(r) for r in await admin.fetch(
        "SELECT ticket_code, status, inside, entries, exits, first_admitted_at, first_gate, "
        "last_entry_at, last_entry_scan_id FROM scanning.tickets WHERE organization_id = $1 "
        "ORDER BY ticket_code", org)]
    for t in tickets:
        t["last_entry_scan_id"] = name.get(t["last_entry_scan_id"])
    events = []
    for r in await admin.fetch("SELECT subject, payload FROM scanning.outbox WHERE organization_id = $1", org):
        e = json.loads(bytes(r["payload"]))
        assert r["subject"] == f"vge.evt.{org}.scanning.{e['type']}"
        e["data"]["scan_id"] = name[uuid.UUID(e["data"]["scan_id"])]
        events.append(json.dumps({"type": e["type"], "actor": e["actor"], "corr": e["correlation_id"],
                                  "occurred_at": e["occurred_at"], "data": e["data"]}, sort_keys=True))
    return {
        "scans": sorted(scans, key=lambda s: (s["device_id"], s["nonce"])),
        "tickets": tickets,
        "occupancy": [dict(r) for r in await admin.fetch(
            "SELECT event_id, inside, entries, exits, updated_at FROM scanning.occupancy "
            "WHERE organization_id = $1 ORDER BY event_id", org)],
        "counts": [dict(r) for r in await admin.fetch(
            "SELECT event_id, dimension, key, entries, exits FROM scanning.occupancy_counts "
            "WHERE organization_id = $1 ORDER BY event_id, dimension, key", org)],
        "dirty": await admin.fetchval("SELECT count(*) FROM scanning.occupancy_dirty WHERE organization_id = $1", org),
        "events": sorted(events),
    }


@pytest.mark.parametrize("seed", range(6))
async def test_set_based_authority_decides_as_the_ordered_loop(authority, admin_dsn, seed):
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
    reentry = seed % 2 == 1
    codes = [f"TKT-{seed}-{n}" for n in range(60)]
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    ev, other_ev = uuid.uuid4(), uuid.uuid4()
    admin = await asyncpg.connect(admin_dsn)
    try:
        # the same event ids and ticket codes in both tenants: both are keyed per tenant
        await _registry(admin, org_a, ev, other_ev, codes, reentry, now)
        await _registry(admin, org_b, ev, other_ev, codes, reentry, now)
        used: list[tuple[str, str]] = []
        alone = total = 0  # scans whose ticket is alone in its batch: the set-based part's share
        for n in range(25):
            if rng.random() < 0.1:
                code = rng.choice(codes)
                for org in (org_a, org_b):
                    await admin.execute("UPDATE scanning.tickets SET status = 'cancelled' "
                                        "WHERE organization_id = $1 AND ticket_code = $2", org, code)
            batch = _batch(rng, n, codes=codes, ev=str(ev), other_ev=str(other_ev), now=now, used=used,
                           offline=rng.random() < 0.4)
            at = now + timedelta(seconds=n)
            set_based = await _decide(authority, "decide_scans", org_a, at, batch)
            ordered = await _decide(authority, "decide_scans_sequential", org_b, at, batch)
            assert set_based == ordered, f"batch {n}: {batch}"
            uses = Counter(s["code"] for s in batch)
            alone += sum(uses[s["code"]] == 1 for s in batch)
            total += len(batch)
        assert alone > total / 2, "most scans exercised the set-based part"
        state_a, state_b = await _state(admin, org_a), await _state(admin, org_b)
        assert state_a["scans"], "the batches recorded scans"
        assert any(t["entries"] for t in state_a["tickets"]), "some tickets were admitted"
        for key in state_a:
            assert state_a[key] == state_b[key], key
    finally:
        await admin.close()
