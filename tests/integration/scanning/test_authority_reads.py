"""What scanning reads does not grow with the tenant's (or every tenant's) rows: a retry or a
ticket scanned twice in one batch (the authority's ordered part, ``decide_scans_sequential``)
looks its scans up by (device, nonce), not among all of the tenant's; an occupancy read finds
its rows by tenant and event, not by event among every tenant's."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from libs.migrations import migrate
from services.scanning.bootstrap import MIGRATIONS

pytestmark = pytest.mark.integration

DECIDE = "SELECT coalesce(jsonb_agg(d ORDER BY (d->>'i')::int), '[]') FROM decide_scans($1, $2, $3) d"


def _entry(ev: uuid.UUID, code: str, device: str, nonce: str, i: int) -> dict[str, Any]:
    return {"i": i, "event_id": str(ev), "code": code, "dir": "entry", "gate": "A", "zone": None,
            "device": device, "nonce": nonce, "scanned_at": None, "offline": False,
            "device_event_id": None, "corr": "c",
            "actor": {"user_id": device, "organization_id": None, "role": None,
                      "is_platform_admin": False, "is_platform_staff": False, "type": "device"}}


async def test_a_retry_a_repeated_nonce_and_an_earlier_offline_entry_read_their_own_scans_only(
    admin_dsn, platform_settings
):
    await migrate(admin_dsn, "scanning", MIGRATIONS, role_password=platform_settings.db_role_password)
    org, ev = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    codes = [f"TKT-{uuid.uuid4().hex}" for _ in range(2_002)]
    admin = await asyncpg.connect(admin_dsn)
    authority = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(
            "INSERT INTO scanning.events (organization_id, event_id, name, capacity, reentry_allowed, "
            "valid_from, valid_until, zones) VALUES ($1, $2, 'Main', 5000, false, $3, $4, '{}')",
            org, ev, now - timedelta(hours=1), now + timedelta(hours=5))
        await admin.execute(
            "INSERT INTO scanning.tickets (organization_id, ticket_code, event_id, ticket_type) "
            "SELECT $1, c, $2, 'GA' FROM unnest($3::text[]) c", org, ev, codes)
        await authority.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        await authority.execute("SET ROLE vge_scanning; SET search_path = scanning, vge")
        # as a service's long-lived session ends up: one plan per statement, made for any tenant
        await authority.execute("SET plan_cache_mode = force_generic_plan")
        # the tenant's first 2,000 admissions
        for start in range(0, 2_000, 500):
            batch = [_entry(ev, codes[n], "gate-1", f"n-{n}", n - start) for n in range(start, start + 500)]
            decided = await authority.fetchval(DECIDE, org, now, batch)
            assert {d["result"] for d in decided} == {"accepted"}

        async with authority.transaction():
            decided = await authority.fetchval(DECIDE, org, now, [
                _entry(ev, codes[7], "gate-1", "n-7", 0),  # a retry: its first decision comes back
                _entry(ev, codes[2_000], "gate-2", "x", 1),  # a new scan ...
                _entry(ev, codes[2_001], "gate-2", "x", 2),  # ... and its nonce again
                # an offline admission earlier than the ticket's: the recorded one becomes the conflict
                {**_entry(ev, codes[5], "gate-3", "o-5", 3), "offline": True, "device_result": "accepted",
                 "scanned_at": (now - timedelta(minutes=30)).isoformat()},
            ])
            read = await authority.fetchrow(
                "SELECT seq_tup_read, coalesce(idx_tup_fetch, 0) AS idx_tup_fetch "
                "FROM pg_stat_xact_user_tables WHERE relid = 'scanning.scans'::regclass")
        assert [(d["result"], d["replayed"], d.get("swap")) for d in decided] == [
            ("accepted", True, None), ("accepted", False, False), ("accepted", True, None),
            ("accepted", False, True)]
        assert decided[2]["scan_id"] == decided[1]["scan_id"]
        # a handful of rows for four scans; all of the tenant's 2,000 before
        assert read["seq_tup_read"] + read["idx_tup_fetch"] <= 20, dict(read)
    finally:
        await authority.close()
        await admin.close()


def _index_conditions(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(relation, index condition) of every scan in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    if "Relation Name" in plan:
        found.append((plan["Relation Name"], plan.get("Index Cond", "")))
    for child in plan.get("Plans", []):
        found += _index_conditions(child)
    return found


async def test_an_occupancy_read_finds_its_rows_by_the_tenant_and_event(admin_dsn, platform_settings):
    # row-level security names the tenant too, but as "this tenant OR a platform read", which no
    # index can serve: a read by event id alone walked every tenant's keys
    from services.scanning.adapters.postgres import OCCUPANCY_READS

    await migrate(admin_dsn, "scanning", MIGRATIONS, role_password=platform_settings.db_role_password)
    org, ev = uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("SET ROLE vge_scanning; SET search_path = scanning, vge")
        await conn.execute("SELECT set_config('vge.org_id', $1, false)", str(org))
        for name, sql in OCCUPANCY_READS.items():
            # a generic plan, as a pooled connection's prepared statement ends up with
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE read_{name}(uuid, uuid) AS {sql}")
            plan = json.loads(await conn.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE read_{name}('{org}', '{ev}')"))[0]["Plan"]
            scans = _index_conditions(plan)
            assert scans and all("organization_id" in cond and "event_id" in cond for _, cond in scans), \
                (name, scans)
    finally:
        await conn.close()
