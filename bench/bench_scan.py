"""Benchmark of the scan command over NATS (not a test: it prints numbers).

    .venv/bin/python bench/bench_scan.py                 # all three phases, embedded servers
    .venv/bin/python bench/bench_scan.py --devices 64 --seconds 10 --rate 1000 --offline 10000
    .venv/bin/python bench/bench_scan.py --offline-repeats 0.3   # 3,000 of the upload scan a ticket again
    .venv/bin/python bench/bench_scan.py --offline-gates 500     # gates scan online during the upload
    .venv/bin/python bench/bench_scan.py --beside audit          # the audit service records every event

Phases: (1) flat out with N concurrent devices; (2) a fixed rate (open loop: latency includes
queueing); (3) one offline batch. Phases 1 and 2 print how soon each admission showed in the
event's ``occupancy.changed`` after its answer (``dashboards:``). Phases 2 and 3 start once the
service has published the events of the phase before (it prints how many were still waiting and
how long that took), so each is measured on a settled system, not on one still working off an
overload. Prints throughput, p50/p95/p99, accepted/rejected counts and the number of double
admissions found in the database (must be 0). The scanning service runs as its own process, as
in production; servers come from VGE_*_URL or are started locally. After phases 1 and 2 it
prints where the machine's cores went (the service, postgres, nats-server, redis-server, this
load generator), how long the service and postgres waited for a core and the CPU they spent per
scan, and how often the service's event loop stalled: all share this machine's two cores. It
times a fixed loop before and after (``host speed``), and the same small work right after a
short sleep against back to back (``wake_penalty``): this VM's speed varies by the hour, and the
figures move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import asyncpg
import httpx
import nats
import orjson
from nats.aio.msg import Msg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.actor import Actor, ActorType  # noqa: E402
from libs.commands import STATUS_HEADER, CommandClient  # noqa: E402
from libs.context import ContextSigner, generate_key_pair, load_private_key  # noqa: E402
from libs.contracts.catalog import EventCreated, TicketIssued, TicketTypeInfo  # noqa: E402
from libs.jetstream import ensure_streams  # noqa: E402
from libs.log import configure_logging  # noqa: E402
from libs.service_process import ServiceProcess, all_healthy, stop_all  # noqa: E402
from libs.settings import Settings, nats_servers  # noqa: E402
from libs.subjects import EVENTS_STREAM  # noqa: E402
from services.audit.bootstrap import DURABLE as AUDIT_DURABLE  # noqa: E402
from loadgen import (  # noqa: E402
    OnReply, PresignedContexts, ReplyInbox, bench_servers, percentile, run, send_at_fixed_rate, service_env,
    settle_heap,
)

SCAN_SUBJECT = "vge.cmd.scanning.scan"
BESIDE = {"audit": AUDIT_DURABLE}  # a service --beside the scanning service: its durable consumer


def report(name: str, latencies: list[float], elapsed: float, accepted: int, rejected: int, errors: int) -> None:
    n = len(latencies)
    print(
        f"{name}: {n} scans in {elapsed:.2f}s = {n / elapsed:,.0f} scans/s | "
        f"p50 {percentile(latencies, 50) * 1000:.2f} ms  p95 {percentile(latencies, 95) * 1000:.2f} ms  "
        f"p99 {percentile(latencies, 99) * 1000:.2f} ms  max {max(latencies, default=0) * 1000:.1f} ms | "
        f"accepted {accepted}  rejected {rejected}  errors {errors}",
        flush=True,
    )


def verdict(args: argparse.Namespace, flat_out: float, p99_ms: float, offline_s: float, doubles: int) -> str:
    """The run against the targets of the scanning issue (#3), each met or not, or why the run
    cannot be judged against them."""
    if ((args.devices, args.rate, args.offline, args.replicas) != (64, 1000.0, 10_000, 1)
            or min(args.seconds, args.rate_seconds) <= 0):
        return ("targets: not judged (they are for 64 devices, 1,000 scans/s and 10,000 offline scans, "
                "one replica, both timed phases run)")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return (f"targets: flat out {flat_out:,.0f}/s >= 3,000: {met(flat_out >= 3000)} | "
            f"p99 at 1,000/s {p99_ms:.2f} ms <= 10 ms: {met(p99_ms <= 10)} | "
            f"offline {offline_s:.2f} s <= 2 s: {met(offline_s <= 2)} | "
            f"double admissions {doubles} = 0: {met(doubles == 0)}")


async def service_sums(port: int) -> dict[str, float]:
    """The sums and counts of the service's own histograms, as they stand now."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vge_") and ("_sum" in line or "_count" in line) and "sync" not in line:
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0]
            sums[key] = sums.get(key, 0.0) + float(value)
        elif line.startswith('vge_event_loop_lag_seconds_bucket{le="0.01"}'):
            sums["loop_on_time_10ms"] = float(line.rpartition(" ")[2])
        elif line.startswith('vge_scan_batch_seconds_bucket{le="0.005"}'):
            sums["batches_within_0.005"] = float(line.rpartition(" ")[2])
        if line.startswith("vge_command_seconds_") and 'subject="vge.cmd.scanning.scan"' in line:
            # the scan command's own count and how many took at most 5 and 10 ms
            value = float(line.rpartition(" ")[2])
            if line.startswith("vge_command_seconds_count"):
                sums["scans_count"] = value
            for le in ("0.005", "0.01"):
                if f'le="{le}"' in line:
                    sums[f"commands_within_{le}"] = value
    return sums


async def service_figures(port: int, before: dict[str, float] | None = None) -> str:
    """Means of the service's own histograms (batch size, batch time, command time), the share
    of batches that took the authority over 5 ms (a slow batch also holds up the scans queued
    behind it), the share of scan commands it took over 5 and over 10 ms for (the rest of a
    client's latency is transit: NATS, the event loops, waiting for a core), and how often its
    event loop stalled for over 10 ms (``vge_event_loop_lag_seconds``), over what it did since
    ``before`` (``service_sums``) or since it started."""
    sums = await service_sums(port)
    for key, value in (before or {}).items():
        sums[key] = sums.get(key, 0.0) - value

    def mean(metric: str) -> float:
        return sums.get(f"{metric}_sum", 0.0) / max(sums.get(f"{metric}_count", 0.0), 1.0)

    def over(le: str) -> float:  # the share of scan commands the service took over ``le`` s for
        scans = sums.get("scans_count", 0.0)
        return (scans - sums.get(f"commands_within_{le}", 0.0)) / max(scans, 1.0)

    batches = sums.get("vge_scan_batch_seconds_count", 0.0)
    slow_batches = (batches - sums.get("batches_within_0.005", 0.0)) / max(batches, 1.0)
    return (f"service: mean batch {mean('vge_scan_batch_size'):.1f} scans, "
            f"{mean('vge_scan_batch_seconds') * 1000:.1f} ms per batch "
            f"({slow_batches:.1%} over 5 ms), "
            f"{mean('vge_command_seconds') * 1000:.1f} ms per command "
            f"({over('0.005'):.1%} over 5 ms, {over('0.01'):.2%} over 10 ms), "
            f"event loop late > 10 ms "
            f"{sums.get('vge_event_loop_lag_seconds_count', 0.0) - sums.get('loop_on_time_10ms', 0.0):.0f} times "
            f"(mean {mean('vge_event_loop_lag_seconds') * 1000:.2f} ms, every 20 ms)")


def cpu_by_program() -> dict[str, tuple[float, float]]:
    """Per program on this machine (the scanning service, postgres with all its processes,
    nats-server, redis-server, this load generator), by name: the CPU seconds it used so far,
    and the seconds it waited for a core while ready to run (its processes' main threads,
    ``/proc/<pid>/schedstat``); the whole machine's busy seconds under ``"busy"``. Linux's
    /proc; empty where there is none."""
    if not os.path.exists("/proc/stat"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, tuple[float, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                waited = int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            waited = 0.0  # ended meanwhile, or a kernel without schedstat: its CPU still counts
        if int(pid) == os.getpid():
            name = "load generator"
        elif any(a.startswith(b"services.") for a in argv):  # python -m services.<name>
            name = next(a for a in argv if a.startswith(b"services.")).decode().split(".")[1] + " service"
        else:
            # ("postgres: vge_scanning ...", "redis-server 127.0.0.1:6379": titles they set)
            name = argv[0].decode(errors="replace").split(":")[0].split(" ")[0].rpartition("/")[2]
            if not name:
                continue  # a kernel thread
        cpu, wait = used.get(name, (0.0, 0.0))
        used[name] = (cpu + (int(fields[11]) + int(fields[12])) / tick, wait + waited)
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    used["busy"] = ((sum(cpu) - cpu[3] - cpu[4]) / tick, 0.0)  # all but idle and iowait
    return used


def cpu_report(before: dict[str, tuple[float, float]], elapsed: float, scans: int) -> str:
    """Cores each program used since ``before`` (``cpu_by_program``): where the machine's
    two cores went during a phase; the share of the phase the scanning service and postgres
    were ready to run but waited for a core (on this VM 12-22% of a phase for the service and
    16-30% for postgres while the machine showed ~0.5 core idle: its kernel packs runnable
    processes onto one core, ``/proc/sys/kernel/sched_vcpu_pack``); and the CPU each of the two
    spent per scan of the phase's ``scans``. That last figure moves with the host's speed but
    not with the waits, so it compares changes better than the latencies do. The same commit
    on 2026-12-07: service 248-433 us per scan flat out (host speed 0.43-0.63 s), 570-674 us
    at 1,000/s, where scans come ~1 ms apart in batches of 2-3 and every batch pays its round
    trip and its wake-ups (see wake_penalty); postgres 140-221 and 443-538 us."""
    after = cpu_by_program()
    if not after:
        return "cpu: (no /proc here)"
    # seconds of CPU and of waiting for a core during the phase, per program
    spent = {name: [now - then for now, then in zip(after[name], before.get(name, (0.0, 0.0)))]
             for name in after}
    cores = {name: cpu / elapsed for name, (cpu, _) in spent.items()}
    busy = cores.pop("busy")
    top = sorted(((c, n) for n, c in cores.items() if c >= 0.01), reverse=True)
    return (f"cpu (cores): machine busy {busy:.2f} of {os.cpu_count()} | "
            + ", ".join(f"{n} {c:.2f}" for c, n in top)
            + " | waited for a core: "
            + ", ".join(f"{n} {spent.get(n, (0.0, 0.0))[1] / elapsed:.0%}"
                        for n in ("scanning service", "postgres"))
            + " | CPU per scan: "
            + ", ".join(f"{n} {spent.get(n, (0.0, 0.0))[0] / max(scans, 1) * 1e6:,.0f} us"
                        for n in ("scanning service", "postgres")))


def host_speed() -> float:
    """Seconds a fixed piece of pure-Python work takes on this machine right now (the same
    VM ran it in 0.34 s in fast spells, 0.38-0.67 s in slow ones). Printed with the results
    so runs are compared like with like; it shows a slow CPU, not the cost of waking a
    process or waiting for a core, which moved the latencies as much (the ``waited for a
    core`` figures show that one)."""
    t0 = time.perf_counter()
    sum(range(30_000_000))
    return time.perf_counter() - t0


def wake_penalty(gap: float = 0.002, rounds: int = 300) -> float:
    """How many times longer a small piece of work (JSON and a hash, ~40 us) takes when it runs
    ``gap`` seconds after the process went to sleep than back to back (medians). A service at
    1,000 scans/s works like that: a scan, a millisecond asleep, the next. This VM measured
    mostly 1.4-2.8, once 0.9 (2026-12-07; the penalty showed also when the process busy-waited
    instead of sleeping: other work on the host evicts ours from the caches, more in some
    minutes than in others). There the scanning service spent 570-674 us of CPU
    per scan at 1,000/s against 248-433 us flat out, nine tenths of it user time: the same
    code, slower when it runs in short spells."""
    doc = {"scans": [{"event_id": str(uuid.uuid4()), "code": f"T{i:08d}", "gate": "g1"} for i in range(20)]}

    def timed(sleep: float) -> float:
        times = []
        for _ in range(rounds):
            if sleep:
                time.sleep(sleep)
            t0 = time.perf_counter()
            json.loads(json.dumps(doc))
            hashlib.sha256(repr(doc).encode()).digest()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return timed(gap) / timed(0.0)


async def double_admissions(dsn: str, org: uuid.UUID) -> int:
    """Tickets of ``org`` admitted (entry accepted) more than once, per the database."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM (SELECT ticket_code FROM scanning.scans WHERE organization_id = $1 "
            "AND result = 'accepted' AND direction = 'entry' GROUP BY ticket_code HAVING count(*) > 1) x", org)
    finally:
        await conn.close()


async def settle(dsn: str, limit: float = 30.0, js: Any = None, durables: Sequence[str] = ()) -> None:
    """Wait until the service has published every event of the phase before, and the
    ``durables`` (consumers of the services run ``--beside`` it) have taken them (at most
    ``limit`` s), so a phase is measured on a settled system, not on one still working off the
    last phase's backlog; prints what it waited for."""
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        first = None
        while True:
            backlog = await conn.fetchval("SELECT count(*) FROM scanning.outbox_unpublished")
            first = backlog if first is None else first
            untaken = 0
            for durable in durables:
                info = await js.consumer_info(EVENTS_STREAM, durable)
                untaken += info.num_pending + info.num_ack_pending
            if backlog == untaken == 0 or time.perf_counter() - t0 > limit:
                break
            await asyncio.sleep(0.1)
        print(f"settled: {first:,} events were still unpublished; waited {time.perf_counter() - t0:.1f}s"
              + ("" if backlog == 0 else f" ({backlog:,} left)")
              + (f" ({untaken:,} not yet taken by {', '.join(durables)})" if untaken else ""), flush=True)
    finally:
        await conn.close()


class DashboardFreshness:
    """How soon each admission of a phase showed on the dashboards: the time from its answer to
    the first ``occupancy.changed`` whose ``entries`` count it (the scanning issue, #3: a
    dashboard sees the latest value within ~100 ms). The k-th admission answered counts as the
    k-th admitted, which holds but for batches answered out of their commit order (a few ms
    apart)."""

    def __init__(self, nc: nats.NATS, org: uuid.UUID, event_id: uuid.UUID) -> None:
        self._nc, self._org, self._event_id = nc, org, event_id
        self.base = 0  # entries when the phase began
        self.answered: list[float] = []
        self.seen: list[tuple[float, int]] = []  # (arrival, entries)
        self._sub: Any = None

    async def start(self, dsn: str) -> None:
        """Read the event's entries so far, then follow its ``occupancy.changed``."""
        conn = await asyncpg.connect(dsn)
        try:
            self.base = await conn.fetchval(
                "SELECT coalesce(max(entries), 0) FROM scanning.occupancy "
                "WHERE organization_id = $1 AND event_id = $2", self._org, self._event_id)
        finally:
            await conn.close()
        self._sub = await self._nc.subscribe(f"vge.evt.{self._org}.scanning.occupancy.changed",
                                             cb=self._on_event)

    async def _on_event(self, msg: Msg) -> None:
        self.seen.append((time.perf_counter(), orjson.loads(msg.data)["data"]["entries"]))

    def admitted(self) -> None:
        """An admission was answered just now."""
        self.answered.append(time.perf_counter())

    async def stop(self, wait: float = 1.0) -> str:
        """After ``wait`` s for the last events: the lags, as a line to print."""
        await asyncio.sleep(wait)
        await self._sub.unsubscribe()
        lags, j, highest = [], 0, 0
        for k, at in enumerate(self.answered, 1):
            while j < len(self.seen) and max(highest, self.seen[j][1]) < self.base + k:
                highest = max(highest, self.seen[j][1])
                j += 1
            lags.append(max(0.0, self.seen[j][0] - at) if j < len(self.seen) else math.inf)
        missing = sum(lag == math.inf for lag in lags)
        return (f"dashboards: each admission in occupancy.changed after its answer: "
                f"p50 {percentile(lags, 50) * 1000:.0f} ms  p95 {percentile(lags, 95) * 1000:.0f} ms  "
                f"p99 {percentile(lags, 99) * 1000:.0f} ms | {len(self.seen)} events, "
                f"{missing} of {len(lags)} admissions not shown {wait:.0f} s after the phase")


async def seed(js, org: uuid.UUID, event_id: uuid.UUID, tickets: int, dsn: str) -> list[str]:
    now = datetime.now(UTC)
    system = Actor.system("bench", org)
    await js.publish(f"vge.evt.{org}.payments.event.created", EventCreated(
        event_id=event_id, name="Bench", starts_at=now, ends_at=now + timedelta(hours=8), capacity=tickets,
        ticket_types=[TicketTypeInfo(code="GA", name="GA", price=1000, quantity=tickets)],
    ).envelope(org, system, "bench").to_bytes())
    codes = [f"TKT-{uuid.uuid4().hex}" for _ in range(tickets)]
    for i in range(0, tickets, 1000):
        await asyncio.gather(*(
            js.publish(f"vge.evt.{org}.payments.ticket.issued",
                       TicketIssued(ticket_code=c, event_id=event_id, ticket_type="GA", issued_at=now)
                       .envelope(org, system, "bench").to_bytes())
            for c in codes[i:i + 1000]
        ))
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.monotonic()
        while await conn.fetchval("SELECT count(*) FROM scanning.tickets WHERE organization_id = $1", org) < tickets:
            if time.monotonic() - t0 > 300:
                raise RuntimeError("registry did not fill")
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return codes


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10.0, help="flat-out phase length")
    ap.add_argument("--rate", type=float, default=1000.0, help="fixed-rate phase, scans/s")
    ap.add_argument("--rate-seconds", type=float, default=10.0)
    ap.add_argument("--offline", type=int, default=10_000, help="offline batch size")
    ap.add_argument("--offline-repeats", type=float, default=0.0,
                    help="share of the offline batch re-scanning a ticket of the batch (0-0.5)")
    ap.add_argument("--offline-gates", type=float, default=0.0,
                    help="scans/s made online at other gates while the offline batch is decided")
    ap.add_argument("--duplicates", type=float, default=0.1, help="share of scans re-scanning a ticket")
    ap.add_argument("--replicas", type=int, default=1, help="scanning service processes")
    ap.add_argument("--beside", action="append", default=[], choices=sorted(BESIDE),
                    help="also run this service as in production (repeatable): audit records "
                         "every event, in transactions of its own, which the outbox relay waits for")
    ap.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--presign", action=argparse.BooleanOptionalAction, default=True,
                    help="sign the commands' contexts before each phase (see PresignedContexts)")
    args = ap.parse_args()
    if not 0 <= args.offline_repeats < 1:
        ap.error("--offline-repeats is a share of the batch, from 0 up to (not including) 1")
    configure_logging("WARNING", "console")
    print(f"host speed: {host_speed():.3f} s for a fixed loop (lower is faster; see host_speed); work "
          f"done right after 2 ms asleep takes {wake_penalty():.1f}x as long (see wake_penalty)", flush=True)

    with bench_servers("scan", Settings(), fsync=args.fsync) as (urls, data):
        private, public = generate_key_pair()
        env = service_env(urls, public)
        services = [ServiceProcess("scanning", env) for _ in range(args.replicas)]
        beside: list[ServiceProcess] = []
        try:
            await all_healthy(services)
            service = services[0]
            nc = await nats.connect(nats_servers(urls["nats_url"]))
            js = nc.jetstream()
            await ensure_streams(js)
            signer = ContextSigner(load_private_key(private))
            presigned = PresignedContexts(signer)
            client = CommandClient(nc, presigned if args.presign else signer, timeout=5.0, ttl=600.0)
            org, event_id = uuid.uuid4(), uuid.uuid4()
            expected = (int(args.seconds * 6000) + int(args.rate * args.rate_seconds) + args.offline
                        + int(args.offline_gates * 10))  # (an upload takes a few seconds at most)
            print(f"seeding {expected:,} tickets ...", flush=True)
            codes = await seed(js, org, event_id, expected, urls["database_url"])
            durables = [BESIDE[name] for name in args.beside]
            if args.beside:
                # started once the tickets are in the registry: they take the seed's events first
                beside = [ServiceProcess(name, env) for name in args.beside]
                await all_healthy(beside)
                print(f"{', '.join(args.beside)} beside it, taking the seed's events ...", flush=True)
                await settle(urls["database_url"], 300.0, js, durables)
            devices = [Actor(user_id=f"bench-{n}", organization_id=org, role=None, type=ActorType.DEVICE)
                       for n in range(args.devices)]
            cursor = iter(codes)
            seen: list[str] = []

            requests = ReplyInbox(nc, timeout=5.0)
            await requests.start()
            run_id, sent, event_id_str = uuid.uuid4().hex, itertools.count(), str(event_id)

            async def send_scan(dev: Actor, on_reply: OnReply, due: float | None = None) -> None:
                if seen and random.random() < args.duplicates:
                    code = random.choice(seen)
                else:
                    code = next(cursor)
                    seen.append(code)
                # nonces and correlation ids from a counter under this run's prefix: unique, as a
                # device's are, without a random UUID each (the devices' work, not the platform's)
                n = next(sent)
                body = orjson.dumps({"event_id": event_id_str, "ticket_code": code, "direction": "entry",
                                     "gate": dev.user_id, "nonce": f"{run_id}-{n}"})
                headers = client.signed_headers(SCAN_SUBJECT, actor=dev, org_id=org,
                                                correlation_id=f"{run_id}-c{n}")
                await requests.send(SCAN_SUBJECT, body, headers, on_reply, due=due)

            def tallying(latencies: list[float], tally: dict[str, int],
                         admitted: Callable[[], None] | None = None) -> OnReply:
                async def on_reply(msg: Msg | None, latency: float) -> None:
                    # an error reply, no reply in time, or NATS's empty "no responders"
                    if msg is None or not msg.data or (msg.headers or {}).get(STATUS_HEADER) == "error":
                        tally["errors"] += 1
                        return
                    latencies.append(latency)
                    result = orjson.loads(msg.data)["result"]
                    tally[result] += 1
                    if admitted is not None and result == "accepted":
                        admitted()
                return on_reply

            if args.presign:
                # flat out: up to 3,000/s; fixed rate: its share per device; a few spare each
                per_device = int((3000 * args.seconds + args.rate * args.rate_seconds) / args.devices) + 16
                print(f"signing {per_device * args.devices:,} contexts ahead ...", flush=True)
                presigned.fill(devices, org, SCAN_SUBJECT, per_device, ttl=600.0)

            # phase 1: flat out, closed loop: each device sends its next scan when its reply comes
            lat: list[float] = []
            tally = {"accepted": 0, "rejected": 0, "errors": 0}
            dashboards = DashboardFreshness(nc, org, event_id)
            await dashboards.start(urls["database_url"])
            record = tallying(lat, tally, dashboards.admitted)
            stop_at = time.perf_counter() + args.seconds

            def device(dev: Actor) -> OnReply:
                async def on_reply(msg: Msg | None, latency: float) -> None:
                    await record(msg, latency)
                    if time.perf_counter() < stop_at:
                        await send_scan(dev, on_reply)
                return on_reply

            print(f"flat out for {args.seconds:.0f}s (service pid {service.pid}) ...", flush=True)
            settle_heap()
            cpu = cpu_by_program()
            t0 = time.perf_counter()
            for d in devices:
                await send_scan(d, device(d))
            await requests.drained()
            flat_out_seconds = time.perf_counter() - t0
            flat_out_rate = len(lat) / flat_out_seconds
            report(f"flat out, {args.devices} devices", lat, flat_out_seconds, **tally)
            print(cpu_report(cpu, time.perf_counter() - t0, sum(tally.values())), flush=True)
            print(await service_figures(service.port), flush=True)
            print(await dashboards.stop(), flush=True)

            # phase 2: fixed rate, open loop
            await settle(urls["database_url"], js=js, durables=durables)
            lat2: list[float] = []
            tally2 = {"accepted": 0, "rejected": 0, "errors": 0}
            dashboards = DashboardFreshness(nc, org, event_id)
            await dashboards.start(urls["database_url"])
            record2 = tallying(lat2, tally2, dashboards.admitted)
            total = int(args.rate * args.rate_seconds)
            before = await service_sums(service.port)
            settle_heap()
            cpu = cpu_by_program()
            t0 = time.perf_counter()
            # (latency from when each scan was due, as an open loop counts it)
            late = await send_at_fixed_rate(args.rate, total,
                                            lambda i, due: send_scan(devices[i % len(devices)], record2, due))
            await requests.drained()
            report(f"fixed {args.rate:,.0f}/s", lat2, time.perf_counter() - t0, **tally2)
            print(f"load generator: {late} of {total} scans sent more than 5 ms late", flush=True)
            print(cpu_report(cpu, time.perf_counter() - t0, sum(tally2.values())), flush=True)
            print(await service_figures(service.port, before), flush=True)
            print(await dashboards.stop(), flush=True)

            # phase 3: one offline batch
            await settle(urls["database_url"], js=js, durables=durables)
            # --offline-repeats: that share of the batch scans a ticket of the batch again, later,
            # at another gate (a conflict, decided by the authority's ordered part)
            repeats = int(args.offline * args.offline_repeats)
            batch_codes = list(itertools.islice(cursor, args.offline - repeats))
            batch_codes += [batch_codes[n % len(batch_codes)] for n in range(repeats)]
            start = datetime.now(UTC) - timedelta(minutes=30)
            scans = [{"event_id": str(event_id), "ticket_code": c, "direction": "entry",
                      "gate": "offline" if n < args.offline - repeats else "offline-2",
                      "nonce": uuid.uuid4().hex,
                      "scanned_at": (start + timedelta(milliseconds=n)).isoformat()}
                     for n, c in enumerate(batch_codes)]
            # --offline-gates: other gates scan online meanwhile; their answers' times, and when
            # each one's scan.accepted event came (an event waits for the transactions that began
            # before its own: libs/outbox.py)
            gate_lat: list[float] = []
            answered: dict[str, float] = {}
            published: dict[str, float] = {}

            async def on_gate_reply(msg: Msg | None, latency: float) -> None:
                if msg is not None and msg.data and (msg.headers or {}).get(STATUS_HEADER) != "error":
                    gate_lat.append(latency)
                    decision = orjson.loads(msg.data)
                    if decision["result"] == "accepted":
                        answered[decision["scan_id"]] = time.perf_counter()

            async def on_event(msg: Msg) -> None:
                published[orjson.loads(msg.data)["data"]["scan_id"]] = time.perf_counter()

            gates = None
            body = orjson.dumps({"scans": scans})
            # before the gates start: a collection of this process holds its loop, where the
            # gates' scans are timed (~30 ms, counted as that much slower)
            settle_heap()
            if args.offline_gates:
                events = await nc.subscribe(f"vge.evt.{org}.scanning.scan.accepted", cb=on_event)
                gates = asyncio.create_task(send_at_fixed_rate(
                    args.offline_gates, int(args.offline_gates * 10),
                    lambda i, due: send_scan(devices[1 + i % (len(devices) - 1)], on_gate_reply, due)))
                await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            # (by hand, not CommandClient.request: with orjson, the encoding and decoding of
            # 10,000 scans hold this process's loop, where the gates' scans are timed, ~10 ms)
            answer = await nc.request(
                "vge.cmd.scanning.sync", body, timeout=60,
                headers=client.signed_headers("vge.cmd.scanning.sync", actor=devices[0], org_id=org,
                                              correlation_id="offline"))
            reply = orjson.loads(answer.data)
            elapsed = time.perf_counter() - t0
            if (answer.headers or {}).get(STATUS_HEADER) == "error":
                raise RuntimeError(f"the offline batch was refused: {reply}")
            if gates is not None:
                gates.cancel()
                await requests.drained()
                await asyncio.sleep(1.0)  # the events of the last answers
                await events.unsubscribe()
            ok = sum(r["result"] == "accepted" for r in reply["results"])
            conflicts = sum(r["conflict"] for r in reply["results"])
            print(f"offline batch: {len(scans):,} scans applied in {elapsed:.2f}s "
                  f"({len(scans) / elapsed:,.0f} scans/s), accepted {ok}, conflicts {conflicts}", flush=True)
            if gate_lat:
                lags = [published.get(scan_id, math.inf) - at for scan_id, at in answered.items()]
                missing = sum(lag == math.inf for lag in lags)
                print(f"gates meanwhile: {len(gate_lat)} scans | answer "
                      f"p50 {percentile(gate_lat, 50) * 1000:.2f} ms  "
                      f"p99 {percentile(gate_lat, 99) * 1000:.2f} ms  max {max(gate_lat) * 1000:.1f} ms | "
                      f"their scan.accepted after the answer: p50 {percentile(lags, 50) * 1000:.0f} ms  "
                      f"p99 {percentile(lags, 99) * 1000:.0f} ms, {missing} of {len(lags)} not within 1 s "
                      "of the upload's end", flush=True)
            await requests.stop()

            doubles = await double_admissions(urls["database_url"], org)
            print(f"double admissions: {doubles}", flush=True)
            print(verdict(args, flat_out_rate, percentile(lat2, 99) * 1000, elapsed, doubles), flush=True)
            print(f"host speed after: {host_speed():.3f} s; after 2 ms asleep {wake_penalty():.1f}x",
                  flush=True)
            await nc.close()
        finally:
            stop_all(services + beside, 20)


if __name__ == "__main__":
    run(main())
