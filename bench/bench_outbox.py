"""Benchmark of the outbox relay alone: what publishing one event costs the service that wrote
it (not a test: it prints numbers).

    .venv/bin/python bench/bench_outbox.py                      # 5 rounds of 20,000 events
    .venv/bin/python bench/bench_outbox.py --events 50000 --rounds 3

The relay runs in the event loop of the service whose commands write the events (at 1,000
scans/s, ~1,000 events/s beside the scans), so its CPU per event is CPU the commands do not
get. Each round writes ``--events`` outbox rows (scan-sized envelopes, in transactions of 500),
then times ``publish_pending`` passes until the outbox is empty: the relay's process CPU per
event (its statements' client side, the publishes and JetStream's answers) and events per
second of wall time. The rows are written before the clock starts, so only relaying counts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.actor import Actor  # noqa: E402
from libs.db import create_pool, service_dsn, tenant_transaction  # noqa: E402
from libs.envelope import Envelope  # noqa: E402
from libs.jetstream import ensure_streams  # noqa: E402
from libs.log import configure_logging  # noqa: E402
from libs.migrations import migrate  # noqa: E402
from libs.outbox import OutboxRelay, add_events  # noqa: E402
from libs.settings import Settings, nats_servers  # noqa: E402
from loadgen import bench_servers  # noqa: E402

SCHEMA = "bench_outbox"


async def write_events(pool, org: uuid.UUID, count: int, round_no: int) -> None:
    """``count`` events of about the size of a ``scan.accepted``, in transactions of 500."""
    actor = Actor.system("bench", org)
    for start in range(0, count, 500):
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, SCHEMA, [
                Envelope(type="scan.accepted", org_id=org, actor=actor, correlation_id=f"b-{round_no}-{n}",
                         data={"n": n, "gate": "north", "pad": "x" * 300})
                for n in range(start, min(start + 500, count))
            ])


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="events relayed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=500, help="the relay's rows per pass")
    args = ap.parse_args()
    configure_logging("WARNING", "console")

    settings = Settings()
    with bench_servers("outbox", settings, fsync=False) as (urls, data):
        admin = urls["database_url"]
        await migrate(admin, SCHEMA, None, role_password=settings.db_role_password)
        pool = await create_pool(service_dsn(admin, SCHEMA, settings.db_role_password), schema=SCHEMA)
        nc = await nats.connect(nats_servers(urls["nats_url"]), user=settings.nats_user,
                                password=settings.nats_password)
        try:
            await ensure_streams(nc.jetstream())
            relay = OutboxRelay(pool, nc, SCHEMA, batch_size=args.batch_size)
            org = uuid.uuid4()
            cpu_per_event = []
            for round_no in range(1, args.rounds + 1):
                await write_events(pool, org, args.events, round_no)
                cpu, wall, relayed = time.process_time(), time.perf_counter(), 0
                while published := await relay.publish_pending():
                    relayed += published
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                cpu_per_event.append(cpu / relayed * 1e6)
                print(f"round {round_no}: {relayed:,} events in {wall:.2f}s = {relayed / wall:,.0f} "
                      f"events/s | relay CPU {cpu_per_event[-1]:.1f} us per event", flush=True)
            print(f"median relay CPU per event: {statistics.median(cpu_per_event):.1f} us "
                  f"(min {min(cpu_per_event):.1f}, max {max(cpu_per_event):.1f})")
        finally:
            await nc.close()
            await pool.close()


if __name__ == "__main__":
    asyncio.run(main())
