"""Benchmark: completed checkouts per second (hold + charge + ledger entry + tickets + outbox
events), and latency at a fixed arrival rate.

Not a test. It starts what it needs and prints the figures::

    .venv/bin/python bench/bench_checkout.py                     # defaults: 32 clients, then 50/s
    .venv/bin/python bench/bench_checkout.py --clients 64 --duration 20 --replicas 2

``--presign`` (the default, as in bench_scan.py) signs the commands' contexts before the
clock starts: signing is the gateway's work and the load generator shares the two cores with
the service.

Servers: the ``VGE_NATS_URL``/``VGE_DATABASE_URL``/``VGE_REDIS_URL`` ones when set, the others
started from the wheels in a temporary folder, deleted at the end (``--no-fsync`` trades
PostgreSQL durability for speed, as the test suite does). The service runs as
``python -m services.payments`` child processes (``--replicas``), so the load generator does not
share its event loop; ``--in-process`` runs it inside this process instead.

Phase 1 (throughput): ``--clients`` buyers each loop create_checkout + complete_checkout
flat out for ``--duration`` seconds. Phase 2 (latency): checkouts arrive at ``--rate`` per
second (open loop: latency counts from the scheduled start, so a stall is not hidden) for
``--rate-duration`` seconds. Between the two, the bench waits for phase 1's events to be
published and then runs ``--warmup`` seconds at the phase-2 rate unmeasured. Each checkout is
one ticket of one type; ``--ticket-types`` spreads the buyers over several types (1 = everyone
on the same inventory row, the worst case).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import nats  # noqa: E402

from libs.actor import Actor, ActorType, Role  # noqa: E402
from libs.commands import CommandClient  # noqa: E402
from libs.context import ContextSigner, generate_key_pair, load_private_key  # noqa: E402
from libs.errors import DomainError  # noqa: E402
from libs.log import configure_logging  # noqa: E402
from libs.service_process import ServiceProcess, stop_all  # noqa: E402
from libs.settings import Settings, nats_servers  # noqa: E402
from loadgen import (  # noqa: E402
    PresignedContexts, at_fixed_rate, bench_servers, percentile, run as run_loop, service_env, settle_heap,
)

PRICE = 25_000


class Bench:
    """One tenant, one event, signed commands."""

    def __init__(self, client: CommandClient, ticket_types: int) -> None:
        self.client = client
        self.org = uuid.uuid4()
        self.actor = Actor(user_id="bench", organization_id=self.org, role=Role.OWNER, type=ActorType.USER)
        self.codes = [f"T{i}" for i in range(ticket_types)]
        self.event_id = ""
        self.n = 0

    async def call(self, name: str, body: dict, timeout: float = 30.0) -> dict:
        return await self.client.request(
            f"vge.cmd.payments.{name}", body, actor=self.actor, org_id=self.org,
            correlation_id=uuid.uuid4().hex, timeout=timeout,
        )

    async def setup(self) -> None:
        start = datetime.now(UTC) + timedelta(days=30)
        event = await self.call("create_event", {
            "name": "bench", "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=4)).isoformat(), "capacity": 10_000_000,
            "ticket_types": [{"code": c, "name": c, "price": PRICE, "quantity": 1_000_000}
                             for c in self.codes],
        })
        self.event_id = event["event_id"]

    async def checkout(self) -> tuple[float, float]:
        """One full checkout; returns (create seconds, complete seconds)."""
        self.n += 1
        code = self.codes[self.n % len(self.codes)]
        t0 = time.perf_counter()
        checkout = await self.call("create_checkout", {
            "event_id": self.event_id, "items": [{"ticket_type": code, "quantity": 1}],
            "customer_email": "bench@example.com"})
        t1 = time.perf_counter()
        done = await self.call("complete_checkout", {
            "checkout_id": checkout["checkout_id"], "payment_token": "tok_ok",
            "idempotency_key": uuid.uuid4().hex})
        if done["status"] != "completed":
            raise RuntimeError(f"checkout {done['status']}: {done.get('reason')}")
        return t1 - t0, time.perf_counter() - t1


async def flat_out(bench: Bench, clients: int, duration: float) -> dict:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = time.perf_counter() + duration

    async def buyer() -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await bench.checkout()
                latencies.append(time.perf_counter() - t)
            except (DomainError, RuntimeError) as exc:
                errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1

    began = time.perf_counter()
    await asyncio.gather(*(buyer() for _ in range(clients)))
    elapsed = time.perf_counter() - began
    return {"completed": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed,
            "latencies": latencies, "errors": errors}


async def fixed_rate(bench: Bench, rate: float, duration: float) -> dict:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    total = int(rate * duration)
    began = time.perf_counter()

    async def one(i: int, due: float) -> None:
        try:
            await bench.checkout()
            latencies.append(time.perf_counter() - due)  # from when it should have started
        except (DomainError, RuntimeError) as exc:
            errors[type(exc).__name__ + ": " + str(exc)[:60]] += 1

    # each checkout starts at its time (not thousands of sleeping coroutines made up front)
    late = await at_fixed_rate(rate, total, one)
    if late:
        print(f"  (the load generator started {late} checkouts more than 5 ms late)")
    elapsed = time.perf_counter() - began
    return {"completed": len(latencies), "seconds": elapsed, "rate": len(latencies) / elapsed,
            "latencies": latencies, "errors": errors}


def report(title: str, result: dict) -> None:
    ms = [x * 1000 for x in result["latencies"]]
    print(f"\n{title}")
    print(f"  completed checkouts : {result['completed']} in {result['seconds']:.1f} s "
          f"= {result['rate']:.0f} checkouts/s")
    if ms:
        print(f"  latency per checkout (create + complete), ms: p50 {percentile(ms, 50):.1f}  "
              f"p95 {percentile(ms, 95):.1f}  p99 {percentile(ms, 99):.1f}  "
              f"max {max(ms):.1f}  mean {statistics.fmean(ms):.1f}")
    errors = sum(result["errors"].values())
    print(f"  errors              : {errors}" + (f" {dict(result['errors'])}" if errors else ""))


async def settle(database_url: str, timeout: float = 15.0) -> None:
    """Wait until the outbox is published (phase 1 leaves a backlog the relay is still
    sending), so the next phase does not measure the one before; prints what it waited for."""
    began = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            backlog = await conn.fetchval("SELECT count(*) FROM payments.outbox_unpublished")
            if backlog == 0 or time.perf_counter() - began > timeout:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    print(f"\nsettled: outbox backlog {backlog} after {time.perf_counter() - began:.1f} s")


async def run(args: argparse.Namespace) -> None:
    configure_logging("WARNING", "console")
    with bench_servers("checkout", Settings(), fsync=not args.no_fsync) as (urls, data):
        print(f"servers: VGE_*_URL where set, the rest started in {data} "
              f"(PostgreSQL fsync {'off' if args.no_fsync else 'on'})")
        await run_against(args, urls)


async def run_against(args: argparse.Namespace, urls: dict[str, str]) -> None:
    """Start the payments service against ``urls``, run both phases and check the books."""
    private, public = generate_key_pair()
    procs: list[ServiceProcess] = []
    runtimes = []
    try:
        if args.in_process:
            from services.payments.bootstrap import build

            for _ in range(args.replicas):
                runtime = build(Settings(environment="test", nats_url=urls["nats_url"],
                                         database_url=urls["database_url"], redis_url=urls["redis_url"],
                                         context_public_keys=public, log_level="WARNING"))
                await runtime.start()
                runtimes.append(runtime)
        else:
            for _ in range(args.replicas):
                env = {**service_env(urls, public), "VGE_LOG_FORMAT": "json"}
                env.pop("VGE_PAYMENTS_CRASH_AFTER", None)
                proc = ServiceProcess("payments", env, cwd=ROOT)
                procs.append(proc)
                await proc.healthy(60)
        print(f"payments: {args.replicas} replica(s), {'in-process' if args.in_process else 'subprocess'}; "
              f"{len(os.sched_getaffinity(0))} CPUs; ticket types: {args.ticket_types}")

        nc = await nats.connect(nats_servers(urls["nats_url"]))
        signer = ContextSigner(load_private_key(private))
        presigned = PresignedContexts(signer)
        client = CommandClient(nc, presigned if args.presign else signer, timeout=30, ttl=600.0)
        bench = Bench(client, args.ticket_types)
        await bench.setup()
        if args.presign:
            # flat out: up to 400/s; then the warm-up and the fixed rate; a few spare
            per_subject = int(400 * args.duration + args.rate * (args.warmup + args.rate_duration)) + 64
            print(f"signing {2 * per_subject:,} contexts ahead ...", flush=True)
            for name in ("create_checkout", "complete_checkout"):
                presigned.fill([bench.actor], bench.org, f"vge.cmd.payments.{name}", per_subject, ttl=600.0)
        for _ in range(20):  # warm up connections and code paths
            await bench.checkout()

        settle_heap()
        report(f"phase 1: {args.clients} concurrent clients, flat out, {args.duration:.0f} s",
               await flat_out(bench, args.clients, args.duration))
        await settle(urls["database_url"])
        if args.warmup > 0:
            # Phase 1 ran the batched statements; a checkout alone runs the single ones, which
            # each pooled connection prepares (and its backend plans) the first time. That is
            # once per connection, not per checkout: keep it out of the measured phase.
            warm = await fixed_rate(bench, args.rate, args.warmup)
            print(f"\nwarm-up: {warm['completed']} checkouts at {args.rate:.0f}/s (not measured)")
        settle_heap()
        report(f"phase 2: fixed arrival rate {args.rate:.0f}/s, {args.rate_duration:.0f} s",
               await fixed_rate(bench, args.rate, args.rate_duration))

        # the books must still be right after the load
        conn = await asyncpg.connect(urls["database_url"])
        try:
            sold = await conn.fetchval("SELECT count(*) FROM payments.tickets WHERE organization_id = $1",
                                       bench.org)
            receivable = await conn.fetchval(
                "SELECT coalesce(sum(CASE side WHEN 'debit' THEN amount ELSE -amount END), 0) "
                "FROM payments.journal_lines WHERE organization_id = $1 AND account = 'processor_receivable'",
                bench.org)
            backlog = await conn.fetchval("SELECT count(*) FROM payments.outbox_unpublished")
        finally:
            await conn.close()
        print(f"\ncheck: tickets sold {sold}, receivable {receivable} = sold x price: "
              f"{receivable == sold * PRICE}; outbox rows not yet published: {backlog}")
        await nc.close()
    finally:
        for runtime in runtimes:
            await runtime.stop()
        stop_all(procs, 15)


def main() -> None:
    """Parse the arguments and run both phases."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent buyers in phase 1")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of phase 1")
    parser.add_argument("--rate", type=float, default=50.0, help="checkouts per second in phase 2")
    parser.add_argument("--rate-duration", type=float, default=15.0, help="seconds of phase 2")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds at the phase-2 rate before it is measured")
    parser.add_argument("--replicas", type=int, default=1, help="payments processes")
    parser.add_argument("--ticket-types", type=int, default=1, help="spread buyers over N types")
    parser.add_argument("--presign", action=argparse.BooleanOptionalAction, default=True,
                        help="sign the commands' contexts before the clock starts (the gateway's "
                        "work, which bench_http_scan.py measures), not as each one is sent")
    parser.add_argument("--in-process", action="store_true", help="run payments in this process")
    parser.add_argument("--no-fsync", action="store_true", help="local PostgreSQL without fsync")
    run_loop(run(parser.parse_args()))


if __name__ == "__main__":
    main()
