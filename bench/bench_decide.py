"""Benchmark of the scan authority alone: ``decide_scans`` called directly (not a test: it prints
numbers).

    .venv/bin/python bench/bench_decide.py                      # batches of 1, 2, 4, 8, 32
    .venv/bin/python bench/bench_decide.py --sizes 2 --calls 1000
    .venv/bin/python bench/bench_decide.py --sizes 2 --candidate my_decide_scans.sql

What it measures: the cost of one call of the authority, as the scanning service makes it (its
login role, its pool settings, fsync on), for batches of fresh online entries, one call at a
time. Each call admits fresh tickets, so every call takes the common path (tickets locked,
scans recorded, tickets changed, events and occupancy written). Prints per batch size the
median, p95 and p99 time of a call and the median per scan. A call's cost is mostly fixed (a
round trip, the function's statements, a commit): at 1,000 scans/s the service's calls carry
~2 scans each, so this fixed part is most of PostgreSQL's work in bench/bench_scan.py.

``--candidate FILE``: SQL run as the schema's owner (e.g. a ``CREATE OR REPLACE FUNCTION
decide_scans ...`` being considered for a migration); each round then measures the migrated
definition and the candidate one after the other, on the same server and the same tables:
rounds differ by ~5% here, so a gain of a tenth of a millisecond per call (~10%) shows.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Iterator

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadgen import bench_servers, percentile  # noqa: E402
from libs.db import create_pool, service_dsn  # noqa: E402
from libs.log import configure_logging  # noqa: E402
from libs.migrations import migrate  # noqa: E402
from libs.settings import Settings  # noqa: E402
from services.scanning.bootstrap import MIGRATIONS  # noqa: E402


async def seed(admin_dsn: str, org: uuid.UUID, event_id: uuid.UUID, tickets: int) -> list[str]:
    """An event of ``org`` with ``tickets`` fresh GA tickets in scanning's registry."""
    now = datetime.now(UTC)
    codes = [f"TKT-{uuid.uuid4().hex}" for _ in range(tickets)]
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(
            "INSERT INTO scanning.events (organization_id, event_id, name, capacity, reentry_allowed, "
            "valid_from, valid_until, zones) VALUES ($1, $2, 'Bench', $3, false, $4, $5, '{}')",
            org, event_id, tickets, now - timedelta(hours=1), now + timedelta(hours=8))
        await conn.execute(
            "INSERT INTO scanning.ticket_types (organization_id, event_id, code, name, zones) "
            "VALUES ($1, $2, 'GA', 'GA', '{}')", org, event_id)
        await conn.execute(
            "INSERT INTO scanning.tickets (organization_id, ticket_code, event_id, ticket_type) "
            "SELECT $1, c, $2, 'GA' FROM unnest($3::text[]) c", org, event_id, codes)
        await conn.execute("VACUUM ANALYZE scanning.tickets")
    finally:
        await conn.close()
    return codes


def scan(event_id: uuid.UUID, code: str, device: int) -> dict[str, object]:
    """One online entry, as the service hands it to the authority."""
    return {"event_id": str(event_id), "code": code, "dir": "entry", "gate": f"G{device % 4}",
            "zone": None, "device": f"bench-{device}", "nonce": uuid.uuid4().hex, "scanned_at": None,
            "offline": False, "device_event_id": None,
            "actor": {"user_id": f"bench-{device}", "organization_id": None, "role": None,
                      "is_platform_admin": False, "is_platform_staff": False, "type": "device"},
            "corr": uuid.uuid4().hex[:16]}


async def measure(admin: str, settings: Settings, org: uuid.UUID, event_id: uuid.UUID,
                  codes: Iterator[str], sizes: list[int], calls: int, label: str) -> None:
    """``calls`` calls of each batch size on a new connection of the service's role (its plans
    are made afresh, for the definition in place now); prints the figures."""
    pool = await create_pool(service_dsn(admin, "scanning", settings.db_role_password),
                             schema="scanning", min_size=1, max_size=1)
    sql = "SELECT coalesce(jsonb_agg(d), '[]') FROM decide_scans($1, $2, $3) d"
    try:
        async with pool.acquire() as conn:
            for _ in range(20):  # warm up: plans cached, caches filled
                await conn.fetchval(sql, org, datetime.now(UTC), [scan(event_id, next(codes), 0)])
            for size in sizes:
                times: list[float] = []
                for n in range(calls):
                    batch = [scan(event_id, next(codes), n + k) for k in range(size)]
                    t0 = time.perf_counter()
                    decided = await conn.fetchval(sql, org, datetime.now(UTC), batch)
                    times.append(time.perf_counter() - t0)
                    if [d["result"] for d in decided] != ["accepted"] * size:
                        raise RuntimeError(f"a fresh ticket was not admitted: {decided}")
                ms = [t * 1000 for t in times]
                med = statistics.median(ms)
                print(f"{label}, {size:>3} scans per call: p50 {med:.3f} ms  "
                      f"p95 {percentile(ms, 95):.3f} ms  p99 {percentile(ms, 99):.3f} ms  "
                      f"({med / size:.3f} ms per scan, {calls} calls)", flush=True)
    finally:
        await pool.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8,32", help="scans per call, comma-separated")
    ap.add_argument("--calls", type=int, default=500, help="calls per batch size")
    ap.add_argument("--rounds", type=int, default=2, help="times to go through the sizes")
    ap.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--candidate", type=Path, help="SQL to compare with the migrated definition")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    configure_logging("WARNING", "console")

    settings = Settings()
    with bench_servers("decide", settings, fsync=args.fsync) as (urls, data):
        admin = urls["database_url"]
        await migrate(admin, "scanning", MIGRATIONS, role_password=settings.db_role_password)
        org, event_id = uuid.uuid4(), uuid.uuid4()
        variants = ["migrated"] + (["candidate"] if args.candidate else [])
        needed = (sum(sizes) * args.calls + 20) * args.rounds * len(variants) + 1000
        print(f"seeding {needed:,} tickets ...", flush=True)
        codes = iter(await seed(admin, org, event_id, needed))
        definitions: dict[str, str] = {}
        owner = await asyncpg.connect(admin)
        try:
            await owner.execute("SET ROLE vge_scanning_owner; SET search_path = scanning, vge")
            definitions["migrated"] = await owner.fetchval(
                "SELECT string_agg(pg_get_functiondef(oid), ';' || chr(10)) FROM pg_proc "
                "WHERE proname = 'decide_scans' AND pronamespace = 'scanning'::regnamespace")
            if args.candidate:
                definitions["candidate"] = args.candidate.read_text()
            for rnd in range(args.rounds):
                for variant in variants:
                    await owner.execute(definitions[variant])
                    await measure(admin, settings, org, event_id, codes, sizes, args.calls,
                                  f"round {rnd + 1}, {variant}")
        finally:
            await owner.close()


if __name__ == "__main__":
    asyncio.run(main())
