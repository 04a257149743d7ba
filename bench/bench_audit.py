"""Benchmark of the audit service: sustained ingest (events/s) and publish-to-record lag.

Not a test: it prints figures. It runs real servers (``libs.servers``, in a temp folder, unless
``VGE_NATS_URL``/``VGE_DATABASE_URL``/``VGE_REDIS_URL`` are set), the audit service as its own
process (``python -m services.audit``; ``--in-process`` to share this process), and publishes
envelopes straight to JetStream, spread over ``--orgs`` tenants. Three phases:

1. backlog: ``--events`` events are published with the audit service stopped, then it starts and
   drains them; ingest rate = events / time from the first record to the last (pure ingest).
2. live flat-out: ``--events`` more published as fast as this client can while it runs; rate =
   events / time from the first publish to the last record (publisher on the same 2 cores).
3. paced: ``--rate`` events/s for ``--duration`` s; lag of each record = recorded_at minus the
   event's occurred_at (set just before its publish) from the database, and the service's own
   after-commit lag histogram (``vge_audit_record_lag_seconds``) from ``/metrics``.

Then every chain is verified, duplicates and dead letters counted. Example::

    .venv/bin/python bench/bench_audit.py --events 20000 --rate 1000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import nats  # noqa: E402

from libs.actor import Actor, ActorType  # noqa: E402
from libs.context import generate_key_pair  # noqa: E402
from libs.db import create_pool, service_dsn  # noqa: E402
from libs.envelope import Envelope  # noqa: E402
from libs.jetstream import ensure_streams  # noqa: E402
from libs.service_process import ServiceProcess, all_healthy, stop_all  # noqa: E402
from libs.settings import Settings, nats_servers  # noqa: E402
from libs.subjects import DEAD_LETTER_STREAM  # noqa: E402
from libs.subjects import event as event_subject  # noqa: E402
from loadgen import bench_servers, percentile, service_env  # noqa: E402

LAG_METRIC = "vge_audit_record_lag_seconds"
HISTOGRAMS = (LAG_METRIC, "vge_audit_ingest_seconds", "vge_audit_ingest_batch_size")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20000, help="events per throughput phase")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s of the paced phase")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the paced phase")
    p.add_argument("--orgs", type=int, default=4, help="tenants the events are spread over")
    p.add_argument("--instances", type=int, default=1, help="audit service processes")
    p.add_argument("--in-process", action="store_true", help="run the audit service in this process")
    p.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync (faster, unsafe)")
    p.add_argument("--skip", choices=["backlog", "live", "paced"], action="append", default=[],
                   help="leave a phase out (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p.parse_args()


class AuditProcesses:
    """The audit service under test: subprocesses or one in-process runtime."""

    def __init__(self, urls: dict[str, str], public_key: str, *, in_process: bool, instances: int,
                 log_dir: Path) -> None:
        self.urls, self.public_key = urls, public_key
        self.in_process, self.instances = in_process, instances
        self.log_dir = log_dir
        self.procs: list[ServiceProcess] = []
        self.ports: list[int] = []
        self.runtime: Any = None

    async def start(self) -> None:
        if self.in_process:
            from services.audit.bootstrap import build

            settings = Settings(
                nats_url=self.urls["nats_url"], database_url=self.urls["database_url"],
                redis_url=self.urls["redis_url"], context_public_keys=self.public_key, health_port=0,
                log_level="WARNING",
            )
            self.runtime = build(settings)
            await self.runtime.start()
            self.ports = [self.runtime.http_port]
            return
        env = {**service_env(self.urls, self.public_key), "VGE_LOG_FORMAT": "json"}
        self.procs = [ServiceProcess("audit", env, log=self.log_dir / f"audit-{i}.log")
                      for i in range(self.instances)]
        await all_healthy(self.procs)  # (a failure's message ends with the log)
        self.ports = [p.port for p in self.procs]  # (known now: a taken port is picked again)

    async def histograms(self) -> dict[str, dict[float, float]]:
        """Cumulative bucket counts of the audit histograms, summed over instances."""
        found: dict[str, dict[float, float]] = {name: {} for name in HISTOGRAMS}
        async with httpx.AsyncClient() as http:
            for port in self.ports:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
                for line in text.splitlines():
                    name = line.split("_bucket{", 1)[0]
                    if name in found:
                        le = line.split('le="', 1)[1].split('"', 1)[0]
                        bound = float("inf") if le == "+Inf" else float(le)
                        buckets = found[name]
                        buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    async def settled_histograms(self) -> dict[str, dict[float, float]]:
        """The histograms once they stop moving (records are counted in the database a moment
        before the service observes their lag, after its commit)."""
        last = await self.histograms()
        while True:
            await asyncio.sleep(0.3)
            now = await self.histograms()
            if now == last:
                return now
            last = now

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
        stop_all(self.procs, 20)
        self.procs.clear()


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus-style ``histogram_quantile`` (linear within the bucket)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0
    if not total:
        return None
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / span if span else 1.0)
        prev_bound, prev_count = bound, count
    return bounds[-1]


class Publisher:
    """Envelopes to JetStream, as the outbox relay publishes them (Nats-Msg-Id = event id)."""

    def __init__(self, js: Any, orgs: list[uuid.UUID]) -> None:
        self.js, self.orgs = js, orgs
        self.n = 0
        self.errors = 0
        self.actors = {o: Actor(user_id="gate-1", organization_id=o, role=None, type=ActorType.DEVICE)
                       for o in orgs}

    def next_event(self) -> Envelope:
        org = self.orgs[self.n % len(self.orgs)]
        self.n += 1
        return Envelope(
            type="scan.accepted", org_id=org, actor=self.actors[org], correlation_id=f"bench-{self.n}",
            data={"scan_id": f"scan-{self.n}", "ticket_code": f"TCK-{self.n:08d}",
                  "event_id": str(org), "gate": "north", "direction": "entry", "result": "accepted"},
        )

    async def _one(self, env: Envelope) -> None:
        try:
            await self.js.publish(event_subject(env.org_id, "scanning", env.type), env.to_bytes(),
                                  headers={"Nats-Msg-Id": str(env.event_id)}, timeout=10)
        except Exception:  # noqa: BLE001 - counted and reported
            self.errors += 1

    async def flat_out(self, count: int, window: int = 256) -> None:
        for i in range(0, count, window):
            await asyncio.gather(*(self._one(self.next_event()) for _ in range(min(window, count - i))))

    async def paced(self, rate: float, duration: float, tick: float = 0.005) -> int:
        loop = asyncio.get_running_loop()
        start, sent, pending = loop.time(), 0, set()
        total = int(rate * duration)
        while sent < total:
            due = min(total, int((loop.time() - start) * rate) + 1)
            while sent < due:
                task = asyncio.create_task(self._one(self.next_event()))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(tick)
        if pending:
            await asyncio.gather(*pending)
        return sent


async def count_records(db: asyncpg.Pool, orgs: list[uuid.UUID]) -> int:
    # the heads' seq, not count(*): a few rows to read however many records there are (the
    # final check below counts the records themselves)
    return await db.fetchval(
        "SELECT coalesce(sum(last_seq), 0) FROM audit.chain_heads WHERE organization_id = ANY($1::uuid[])",
        orgs,
    )


async def wait_for(db: asyncpg.Pool, orgs: list[uuid.UUID], target: int, timeout: float = 300.0,
                   poll: float = 0.05, base: int | None = None) -> tuple[float | None, float]:
    """(monotonic time the first record past ``base`` showed up, time ``target`` was reached).
    ``base``: the count the records are new against (default: the count at the call)."""
    if base is None:
        base = await count_records(db, orgs)
    first: float | None = None
    deadline = time.monotonic() + timeout
    while True:
        n = await count_records(db, orgs)
        now = time.monotonic()
        if first is None and n > base:
            first = now
        if n >= target:
            return first, now
        if now > deadline:
            raise RuntimeError(f"only {n} of {target} records after {timeout}s")
        await asyncio.sleep(poll)


async def run(args: argparse.Namespace, urls: dict[str, str], work: Path) -> dict[str, Any]:
    _, public_key = generate_key_pair()
    audit = AuditProcesses(urls, public_key, in_process=args.in_process, instances=args.instances,
                           log_dir=work)
    nc = await nats.connect(nats_servers(urls["nats_url"]))
    js = nc.jetstream()
    await ensure_streams(js)
    db = await asyncpg.create_pool(urls["database_url"], min_size=1, max_size=4)
    orgs = [uuid.uuid4() for _ in range(args.orgs)]
    pub = Publisher(js, orgs)
    result: dict[str, Any] = {
        "events": args.events, "orgs": args.orgs, "instances": 1 if args.in_process else args.instances,
        "audit": "in-process" if args.in_process else "subprocess", "fsync": not args.no_fsync,
    }
    dlq_before = (await js.stream_info(DEAD_LETTER_STREAM)).state.messages
    started = False
    try:
        expected = 0
        if "backlog" not in args.skip:
            # migrate first (and let the service create its durable) so the drain is pure ingest
            await audit.start()
            await audit.stop()
            await pub.flat_out(args.events)
            before, expected = expected, expected + args.events
            # watched from before the start: the service consumes before it answers /healthz,
            # and a small backlog can be drained by then
            drained = asyncio.create_task(wait_for(db, orgs, expected, base=before))
            await audit.start()
            started = True
            first, last = await drained
            assert first is not None  # (set no later than the poll that saw ``expected``)
            if last > first:
                result["backlog_ingest_events_per_s"] = round(args.events / (last - first))
            else:
                # drained between two polls (50 ms): too short to time, not infinitely fast
                result["backlog_ingest_events_per_s"] = None
                print(f"backlog: {args.events:,} events were drained between two polls; "
                      "too few to time (use more --events)", file=sys.stderr)
        if not started:
            await audit.start()
            started = True
        if "live" not in args.skip:
            t0 = time.monotonic()
            await pub.flat_out(args.events)
            published = time.monotonic()
            expected += args.events
            _, last = await wait_for(db, orgs, expected)
            result["live_publish_events_per_s"] = round(args.events / (published - t0))
            result["live_ingest_events_per_s"] = round(args.events / (last - t0))
        if "paced" not in args.skip:
            before = await audit.settled_histograms()
            mark = time.time()
            sent = await pub.paced(args.rate, args.duration)
            expected += sent
            await wait_for(db, orgs, expected)
            after = await audit.settled_histograms()
            rows = await db.fetch(
                "SELECT extract(epoch FROM recorded_at - occurred_at) AS lag, "
                "floor(extract(epoch FROM occurred_at) - $2) AS second FROM audit.records "
                "WHERE organization_id = ANY($1::uuid[]) AND occurred_at >= to_timestamp($2)",
                orgs, mark,
            )
            lags = sorted(float(r["lag"]) for r in rows)
            worst: dict[int, float] = {}
            for r in rows:
                worst[int(r["second"])] = max(worst.get(int(r["second"]), 0.0), float(r["lag"]))
            delta = {
                name: {b: after[name].get(b, 0) - before[name].get(b, 0) for b in after[name]}
                for name in HISTOGRAMS
            }

            def quantiles(name: str, scale: float = 1000.0) -> dict[str, float | None]:
                return {
                    f"p{int(q * 100)}": None if (v := quantile_from_buckets(delta[name], q)) is None
                    else round(v * scale, 1)
                    for q in (0.5, 0.95, 0.99)
                }

            result["paced"] = {
                "target_events_per_s": args.rate, "seconds": args.duration, "sent": sent,
                "lag_ms_at_insert": {
                    "p50": round(percentile(lags, 50) * 1000, 1),
                    "p95": round(percentile(lags, 95) * 1000, 1),
                    "p99": round(percentile(lags, 99) * 1000, 1),
                    "max": round(lags[-1] * 1000, 1), "mean": round(statistics.fmean(lags) * 1000, 1),
                },
                "worst_lag_ms_per_second": [round(worst[k] * 1000) for k in sorted(worst)],
                "lag_ms_after_commit_histogram": quantiles(LAG_METRIC),
                "batch_ms_histogram": quantiles("vge_audit_ingest_seconds"),
                "batch_size_histogram": quantiles("vge_audit_ingest_batch_size", 1.0),
            }
        # correctness of what was measured
        stats = await db.fetch(
            "SELECT organization_id, count(*) AS n, count(DISTINCT event_id) AS d, max(seq) AS hi "
            "FROM audit.records WHERE organization_id = ANY($1::uuid[]) GROUP BY organization_id", orgs,
        )
        total = sum(r["n"] for r in stats)
        from services.audit import handlers
        from services.audit.adapters.postgres import PostgresAuditLog

        pool = await create_pool(service_dsn(urls["database_url"], "audit", Settings().db_role_password),
                                 schema="audit", min_size=1, max_size=2)
        try:
            verified = [await handlers.verify_tenant(PostgresAuditLog(pool), o) for o in orgs]
        finally:
            await pool.close()
        result["errors"] = {
            "publish_failures": pub.errors,
            "missing_records": expected - total,
            "duplicate_records": sum(r["n"] - r["d"] for r in stats),
            "gaps": sum(r["hi"] - r["n"] for r in stats),
            "chains_failing_verification": sum(not v.ok for v in verified),
            "dead_letters": (await js.stream_info(DEAD_LETTER_STREAM)).state.messages - dlq_before,
        }
        result["records"] = total
    finally:
        await audit.stop()
        await db.close()
        await nc.close()
    return result


def main() -> None:
    args = parse_args()
    with bench_servers("audit", Settings(), fsync=not args.no_fsync) as (urls, work):
        result = asyncio.run(run(args, urls, work))
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))
    paced = result.get("paced")
    print("\nsummary:")
    for key in ("backlog_ingest_events_per_s", "live_ingest_events_per_s"):
        if result.get(key) is not None:
            print(f"  {key:34s} {result[key]:>8,}")
    if paced:
        lag = paced["lag_ms_at_insert"]
        print(f"  lag at {paced['target_events_per_s']:.0f} ev/s (ms)           "
              f"p50 {lag['p50']}  p95 {lag['p95']}  p99 {lag['p99']}  max {lag['max']}")
        print(f"  after-commit histogram (ms)        {paced['lag_ms_after_commit_histogram']}")
        print(f"  worst lag at insert per second     {paced['worst_lag_ms_per_second']}")
        print(f"  batch time (ms) / batch size       {paced['batch_ms_histogram']} / {paced['batch_size_histogram']}")
    print(f"  errors                             {result['errors']}")


if __name__ == "__main__":
    main()
