"""Benchmark of ``POST /v1/scans`` over HTTP, through the gateway (not a test: it prints numbers).

    .venv/bin/python bench/bench_http_scan.py                      # flat out, 64 devices, then 500/s
    .venv/bin/python bench/bench_http_scan.py --devices 64 --seconds 10 --rate 500 --rate-seconds 10
    .venv/bin/python bench/bench_http_scan.py --client httpx       # httpx.AsyncClient as the client
    .venv/bin/python bench/bench_http_scan.py --profile /tmp/prof  # py-spy the services (flat out)
    .venv/bin/python bench/bench_http_scan.py --seconds 0 --rate 0 --upload 10000   # the upload alone
    PYTHONPATH=/tmp/speedups .venv/bin/python bench/bench_http_scan.py --uvloop   # with httptools,
        # uvloop installed there (pip install --target /tmp/speedups httptools uvloop)

What runs: NATS, PostgreSQL and Redis (``VGE_*_URL``, or started locally as ``bench_scan`` does),
the scanning service and the gateway each as their own process, as in production. Scanning's
registry is seeded the way ``bench_scan`` does it (payments' catalog events on JetStream); the
tenant is made with the operator command (``create_tenant``), and N gate devices are registered
and enrolled through the HTTP API. Every device then scans with its own device token.

Phases: (1) flat out, every device one scan at a time; (2) a fixed rate (open loop: latency
includes queueing); (3) one device uploads an offline batch (``POST /v1/scans/batch``) while
the others scan at ``--upload-gates``/s, and the gates' answers meanwhile are timed. Phases 1-2
print throughput, p50/p95/p99, accepted/rejected counts, errors by HTTP status, and where the
CPU went (seconds per process group: on a small machine client, gateway, scanning and the
servers share the cores). At the end: double admissions found in the database
(must be 0) and the accepted entries the database holds against those the client saw.

The default client is a minimal HTTP/1.1 keep-alive client (a connection per device, as a gate
holds one; more only while its requests overlap), so that the benchmark's own CPU stays small;
``--client httpx`` uses httpx instead (one pooled client: far more client CPU per request).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_scan import double_admissions, report, seed  # noqa: E402
from loadgen import (  # noqa: E402
    at_fixed_rate, bench_servers, percentile, run, service_env, settle_heap,
)

from libs.context import generate_key_pair  # noqa: E402
from libs.jetstream import ensure_streams  # noqa: E402
from libs.log import configure_logging  # noqa: E402
from libs.service_process import ServiceProcess, all_healthy, stop_all  # noqa: E402
from libs.settings import Settings, nats_servers  # noqa: E402
from services.gateway.cli import create_tenant  # noqa: E402

HOST = "127.0.0.1"


# -- clients -----------------------------------------------------------------------------------


class RawConnection:
    """One HTTP/1.1 keep-alive connection: write a request, read status, headers and body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        first = await self.reader.readline()
        if not first:
            self.close()
            raise ConnectionResetError("server closed the connection")
        status = int(first.split(b" ", 2)[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.close()
            raise ConnectionResetError("server closed the connection")
        return status, data

    def close(self) -> None:
        self.writer.close()


class RawDevice:
    """A gate device with its token, on keep-alive connections of its own: at most
    ``connections`` scans in flight (a gate app sends one at a time; when scans come faster
    than answers, the next one waits on the device, and its latency, counted from when it was
    due, says so), not a new connection for every scan that finds the last one busy."""

    IDLE_SECONDS = 4.0  # below uvicorn's keep-alive timeout (5 s): it closes idle connections

    def __init__(self, port: int, token: str, gate: str, connections: int = 1) -> None:
        self.port, self.gate, self.token = port, gate, token
        self.head = (f"POST /v1/scans HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                     f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n").encode()
        self.idle: list[tuple[RawConnection, float]] = []
        self.slots = asyncio.Semaphore(connections)

    async def _connection(self) -> tuple[RawConnection, bool]:
        while self.idle:
            conn, since = self.idle.pop()
            if time.monotonic() - since < self.IDLE_SECONDS:
                return conn, True
            conn.close()
        return await RawConnection.open(self.port), False

    async def scan(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.slots:
            return await self._scan(body)

    async def _scan(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        payload = json.dumps(body).encode()
        conn, reused = await self._connection()
        try:
            try:
                status, data = await conn.post(self.head, payload)
            except (ConnectionResetError, asyncio.IncompleteReadError):
                if not reused:
                    raise
                # the server closed a kept-alive connection: once more on a new one (the nonce
                # makes the retry safe, as a gate's own retry would be)
                conn = await RawConnection.open(self.port)
                status, data = await conn.post(self.head, payload)
        except BaseException:
            conn.close()
            raise
        self.idle.append((conn, time.monotonic()))
        return status, json.loads(data)

    async def close(self) -> None:
        for conn, _ in self.idle:
            conn.close()


class HttpxDevice:
    """The same device on httpx (one pooled client for all devices)."""

    def __init__(self, client: httpx.AsyncClient, token: str, gate: str) -> None:
        self.client, self.gate, self.token = client, gate, token
        self.headers = {"Authorization": f"Bearer {token}"}

    async def scan(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        r = await self.client.post("/v1/scans", json=body, headers=self.headers)
        return r.status_code, r.json()

    async def close(self) -> None:
        pass


# -- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds so far) of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


class CpuMeter:
    """CPU seconds per group of processes: the client, each service, and the servers started
    for this run (the processes whose command line names one of ``markers``, e.g. the data dir
    or redis' ``host:port`` title, and their children)."""

    def __init__(self, markers: list[str], services: dict[str, list[int]]) -> None:
        self.markers = markers
        self.fixed = {"client": [os.getpid()], **services}

    def _servers(self) -> dict[str, list[int]]:
        table: dict[int, tuple[int, str]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    comm = (entry / "comm").read_text().strip()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                stat = _stat(int(entry.name))
                if stat is not None:
                    ours = any(m in cmd for m in self.markers)
                    table[int(entry.name)] = (stat[0], comm if ours else "")
        groups: dict[str, list[int]] = {}
        for pid, (_, comm) in table.items():
            root, hops = pid, 0
            while root in table and not table[root][1] and hops < 5:
                root, hops = table[root][0], hops + 1
            if root in table and table[root][1]:
                name = table[root][1]
                name = "postgres" if name.startswith("postgres") else name
                groups.setdefault(name, []).append(pid)
        return groups

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pids in {**self.fixed, **self._servers()}.items():
            out[name] = sum(s[1] for p in pids if (s := _stat(p)) is not None)
        # the whole machine (user, nice, system, irq, softirq, steal), to see who else ran
        ticks = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        out[" machine"] = sum(int(ticks[i]) for i in (0, 1, 2, 5, 6, 7)) / _TICK
        return out

    @staticmethod
    def line(before: dict[str, float], after: dict[str, float], elapsed: float, scans: int) -> str:
        used = {k: after[k] - before.get(k, 0.0) for k in after}
        machine = used.pop(" machine")
        total = sum(used.values())
        order = sorted(used.items(), key=lambda kv: -kv[1])
        parts = "  ".join(f"{k} {v / elapsed:.2f}" for k, v in order)
        per_scan = "  ".join(f"{k} {v * 1000 / max(scans, 1):.2f}" for k, v in order)
        return (f"  CPU (cores busy on average): this run {total / elapsed:.2f} = {parts}\n"
                f"  CPU per scan (ms): all {total * 1000 / max(scans, 1):.2f} = {per_scan}\n"
                f"  machine: {machine / elapsed:.2f} of {os.cpu_count()} cores busy "
                f"(everything else: {max(0.0, machine - total) / elapsed:.2f})")


# -- the services' own view (their /metrics) -------------------------------------------------

# (what, metric family, label filter): means of histograms, as deltas over a phase
_MEANS = (
    ("gateway time to first byte", "vge_http_request_seconds", {"route": "/v1/scans"}),
    ("scanning command time", "vge_command_seconds", {"subject": "vge.cmd.scanning.scan"}),
    ("scans per database round trip", "vge_scan_batch_size", {}),
)


async def scrape(http: httpx.AsyncClient, ports: list[int]) -> dict[str, tuple[float, float]]:
    """(sum, count) per entry of ``_MEANS``, summed over the services on ``ports``."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {name: (0.0, 0.0) for name, _, _ in _MEANS}
    for port in ports:
        text = (await http.get(f"http://{HOST}:{port}/metrics")).text
        for family in text_string_to_metric_families(text):
            for name, metric, labels in _MEANS:
                if family.name != metric:
                    continue
                for sample in family.samples:
                    if all(sample.labels.get(k) == v for k, v in labels.items()):
                        total, count = out[name]
                        if sample.name.endswith("_sum"):
                            out[name] = (total + sample.value, count)
                        elif sample.name.endswith("_count"):
                            out[name] = (total, count + sample.value)
    return out


def means_line(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str:
    parts = []
    for name, (total, count) in after.items():
        d_total, d_count = total - before[name][0], count - before[name][1]
        if d_count:
            mean = d_total / d_count
            parts.append(f"{name} {mean * 1000:.2f} ms" if "time" in name else f"{name} {mean:.1f}")
    return "  services (means): " + ";  ".join(parts)


# -- the run ----------------------------------------------------------------------------------


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=64, help="concurrent gate devices")
    ap.add_argument("--seconds", type=float, default=10.0, help="flat-out phase length (0: skip)")
    ap.add_argument("--rate", type=float, default=500.0, help="fixed-rate phase, scans/s (0: skip)")
    ap.add_argument("--rate-seconds", type=float, default=10.0)
    ap.add_argument("--duplicates", type=float, default=0.1, help="share of scans re-scanning a ticket")
    ap.add_argument("--tickets", type=int, default=0, help="tickets to seed (default: enough)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw")
    ap.add_argument("--connections-per-device", type=int, default=1,
                    help="scans a device may have in flight (raw client), each on its own connection")
    ap.add_argument("--gateways", type=int, default=1, help="gateway processes (devices spread over them)")
    ap.add_argument("--replicas", type=int, default=1, help="scanning service processes")
    ap.add_argument("--profile", type=Path, help="py-spy the services in the flat-out phase, into DIR")
    ap.add_argument("--uvloop", action="store_true",
                    help="run the services on uvloop (it must be importable, e.g. via PYTHONPATH)")
    ap.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--upload", type=int, default=10_000,
                    help="phase 3: one device uploads this many offline scans (0: skip) ...")
    ap.add_argument("--upload-gates", type=float, default=200.0,
                    help="... while the others scan at this rate, scans/s")
    args = ap.parse_args()
    configure_logging("WARNING", "console")

    with bench_servers("http", Settings(), fsync=args.fsync) as (urls, data):
        private, public = generate_key_pair()
        env = service_env(urls, public)

        def service(name: str) -> list[str]:
            if not args.uvloop:
                return [sys.executable, "-m", name]
            return [sys.executable, "-c", "import asyncio, runpy, uvloop; "
                    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
                    f"runpy.run_module({name!r}, run_name='__main__', alter_sys=True)"]

        scanning = [ServiceProcess("scanning", env, command=service("services.scanning"))
                    for _ in range(args.replicas)]
        gateways = [ServiceProcess("gateway", {**env, "VGE_CONTEXT_PRIVATE_KEY": private},
                                   port_setting="VGE_GATEWAY_PORT", command=service("services.gateway"))
                    for _ in range(args.gateways)]
        devices: list[Any] = []
        clients: dict[int, httpx.AsyncClient] = {}
        nc = None
        try:
            await all_healthy(scanning + gateways)
            # (known now: a port taken before its service bound it was picked again)
            scan_ports, gw_ports = [p.port for p in scanning], [p.port for p in gateways]
            nc = await nats.connect(nats_servers(urls["nats_url"]))
            js = nc.jetstream()
            await ensure_streams(js)
            org, owner_key = await create_tenant(Settings(database_url=urls["database_url"]), "Bench")
            event_id = uuid.uuid4()
            tickets = args.tickets or int(args.seconds * 2500 + args.rate * args.rate_seconds
                                          + args.upload + args.upload_gates * 10) + 1000
            print(f"seeding {tickets:,} tickets ...", flush=True)
            codes = await seed(js, org, event_id, tickets, urls["database_url"])

            # register and enrol the devices through the API, with the owner key
            async with httpx.AsyncClient(timeout=30) as admin:
                async def enrol(n: int) -> tuple[int, str, str]:
                    port, gate = gw_ports[n % len(gw_ports)], f"gate-{n}"
                    r = await admin.post(f"http://{HOST}:{port}/v1/devices",
                                         json={"name": gate, "event_id": str(event_id), "gate": gate},
                                         headers={"Authorization": f"Bearer {owner_key}"})
                    r.raise_for_status()
                    e = await admin.post(f"http://{HOST}:{port}/v1/devices/enrol",
                                         json={"enrolment_token": r.json()["enrolment_token"]})
                    e.raise_for_status()
                    return port, e.json()["device_token"], gate

                enrolled = []
                for i in range(0, args.devices, 8):
                    enrolled += await asyncio.gather(*(enrol(n) for n in range(i, min(i + 8, args.devices))))
            if args.client == "httpx":
                # one client per gateway port; no limit on connections (64 devices, open-loop bursts)
                clients = {p: httpx.AsyncClient(base_url=f"http://{HOST}:{p}", timeout=30,
                                                limits=httpx.Limits(max_connections=None,
                                                                    max_keepalive_connections=None))
                           for p in gw_ports}
                devices = [HttpxDevice(clients[port], token, gate) for port, token, gate in enrolled]
            else:
                devices = [RawDevice(port, token, gate, args.connections_per_device)
                           for port, token, gate in enrolled]  # fmt: skip
            speedups = [m for m in ("httptools", "uvloop") if importlib.util.find_spec(m) is not None]
            print(f"importable speedups: {', '.join(speedups) or 'none'} (uvicorn takes httptools when "
                  f"importable; services on uvloop: {'yes' if args.uvloop else 'no'})", flush=True)
            print(f"{len(devices)} devices enrolled over HTTP; client: {args.client}; "
                  f"gateway pid(s) {[g.pid for g in gateways]}, scanning pid(s) {[s.pid for s in scanning]}",
                  flush=True)

            # warm up: a connection and a cached credential per device (unknown codes: no admission)
            for dev in devices:
                status, body = await dev.scan({"event_id": str(event_id),
                                               "ticket_code": f"WARMUP-{uuid.uuid4().hex}"})
                assert status == 200 and body["reason"] == "unknown_ticket", (status, body)

            cursor = iter(codes)
            seen: list[str] = []
            totals = Counter()

            def next_code() -> str:
                if seen and random.random() < args.duplicates:
                    return random.choice(seen)
                code = next(cursor, None)
                if code is None:  # out of fresh tickets: re-scan (a rejection, still a scan)
                    return random.choice(seen)
                seen.append(code)
                return code

            async def scan_one(dev: Any, latencies: list[float], tally: Counter,
                               due: float | None = None) -> None:
                # (latency from ``due`` at a fixed rate, as an open loop counts it)
                body = {"event_id": str(event_id), "ticket_code": next_code(), "direction": "entry",
                        "nonce": uuid.uuid4().hex}
                t0 = time.perf_counter() if due is None else due
                try:
                    status, reply = await dev.scan(body)
                except Exception as exc:  # noqa: BLE001 - count it, keep going
                    tally[f"error {type(exc).__name__}"] += 1
                    return
                latencies.append(time.perf_counter() - t0)
                if status == 200:
                    tally[reply["result"]] += 1
                else:
                    tally[f"HTTP {status}"] += 1

            redis_port = urls["redis_url"].rsplit(":", 1)[1].split("/")[0]
            probe = httpx.AsyncClient(timeout=10)
            clients[0] = probe  # closed with the others
            service_ports = gw_ports + scan_ports
            meter = CpuMeter([str(data), f"{HOST}:{redis_port}"],
                             {"gateway": [g.pid for g in gateways], "scanning": [s.pid for s in scanning]})

            def summary(name: str, lat: list[float], elapsed: float, tally: Counter) -> None:
                errors = sum(v for k, v in tally.items() if k not in ("accepted", "rejected"))
                report(name, lat, elapsed, tally["accepted"], tally["rejected"], errors)
                if errors:
                    print("  errors: " + ", ".join(f"{k} x{v}" for k, v in tally.items()
                                                   if k not in ("accepted", "rejected")), flush=True)
                totals.update(tally)

            # phase 1: flat out
            if args.seconds > 0:
                lat: list[float] = []
                tally: Counter = Counter()
                spies = []
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = str(Path(sys.executable).parent / "py-spy")
                    for role, procs in (("gateway", gateways), ("scanning", scanning)):
                        for proc in procs:
                            out = args.profile / f"{role}-{proc.pid}.txt"
                            spies.append(subprocess.Popen(
                                [spy, "record", "--pid", str(proc.pid), "--duration", str(int(args.seconds)),
                                 "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                    await asyncio.sleep(1.0)  # py-spy attaches
                stop_at = time.perf_counter() + args.seconds

                async def device_loop(dev: Any) -> None:
                    while time.perf_counter() < stop_at:
                        await scan_one(dev, lat, tally)

                print(f"flat out for {args.seconds:.0f}s ...", flush=True)
                settle_heap()
                seen0 = await scrape(probe, service_ports)
                cpu0, t0 = meter.sample(), time.perf_counter()
                await asyncio.gather(*(device_loop(d) for d in devices))
                elapsed = time.perf_counter() - t0
                cpu1 = meter.sample()
                summary(f"flat out, {len(devices)} devices", lat, elapsed, tally)
                print(meter.line(cpu0, cpu1, elapsed, len(lat)), flush=True)
                print(means_line(seen0, await scrape(probe, service_ports)), flush=True)
                for s in spies:
                    s.wait(60)
                if spies:
                    print(f"  profiles (py-spy raw, collapsed stacks) in {args.profile}", flush=True)
                await asyncio.sleep(2.0)  # let the outbox relay and coalescing settle

            # phase 2: fixed rate, open loop
            if args.rate > 0:
                lat2: list[float] = []
                tally2: Counter = Counter()
                total = int(args.rate * args.rate_seconds)
                settle_heap()
                cpu0, t0 = meter.sample(), time.perf_counter()
                seen0 = await scrape(probe, service_ports)
                # (late: requests the client itself could not start on schedule)
                late = await at_fixed_rate(
                    args.rate, total, lambda i, due: scan_one(devices[i % len(devices)], lat2, tally2, due))
                elapsed = time.perf_counter() - t0
                cpu1 = meter.sample()
                summary(f"fixed {args.rate:,.0f}/s, {len(devices)} devices", lat2, elapsed, tally2)
                print(meter.line(cpu0, cpu1, elapsed, len(lat2)), flush=True)
                print(means_line(seen0, await scrape(probe, service_ports)), flush=True)
                if late:
                    print(f"  {late} requests were sent more than 5 ms late (client behind schedule)",
                          flush=True)
                print(f"  p99 {percentile(lat2, 99) * 1000:.2f} ms at {args.rate:,.0f} scans/s "
                      f"(target: <= 20 ms)", flush=True)

            # phase 3: an offline upload through the gateway while the other gates scan
            if args.upload:
                await asyncio.sleep(2.0)  # the events of the phase before
                uploader, others = devices[0], devices[1:]
                start = datetime.now(UTC) - timedelta(minutes=30)
                scans = [{"event_id": str(event_id), "ticket_code": next(cursor), "direction": "entry",
                          "nonce": uuid.uuid4().hex,
                          "scanned_at": (start + timedelta(milliseconds=n)).isoformat()}
                         for n in range(args.upload)]
                body = json.dumps({"scans": scans}).encode()
                port = gw_ports[0]
                head = (f"POST /v1/scans/batch HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                        f"Authorization: Bearer {uploader.token}\r\n"
                        "Content-Type: application/json\r\n").encode()
                connection = await RawConnection.open(port)
                lat3: list[float] = []
                tally3: Counter = Counter()
                settle_heap()  # (not once the gates scan: it holds this loop, where they are timed)
                gates = asyncio.create_task(at_fixed_rate(
                    args.upload_gates, int(args.upload_gates * 30),
                    lambda i, due: scan_one(others[i % len(others)], lat3, tally3, due)))
                await asyncio.sleep(0.5)
                before = len(lat3)
                t0 = time.perf_counter()
                status, answer = await connection.post(head, body)
                elapsed = time.perf_counter() - t0
                during = lat3[before:]
                gates.cancel()
                connection.close()
                if status != 200:
                    raise RuntimeError(f"the upload was refused: HTTP {status} {answer[:300]!r}")
                results = json.loads(answer)["results"]
                print(f"offline upload over HTTP: {len(scans):,} scans in {elapsed:.2f}s, "
                      f"accepted {sum(r['result'] == 'accepted' for r in results)}", flush=True)
                if during:
                    print(f"gates meanwhile ({args.upload_gates:,.0f}/s): {len(during)} scans | answer "
                          f"p50 {percentile(during, 50) * 1000:.2f} ms  "
                          f"p99 {percentile(during, 99) * 1000:.2f} ms  max {max(during) * 1000:.1f} ms",
                          flush=True)
                totals["accepted"] += sum(r["result"] == "accepted" for r in results)
                await asyncio.sleep(1.0)  # the gates' scans still in flight
                totals.update(tally3)

            # the database's word
            dsn = urls["database_url"]
            conn = await asyncpg.connect(dsn)
            try:
                in_db = await conn.fetchval(
                    "SELECT count(*) FROM scanning.scans WHERE organization_id = $1 AND result = 'accepted' "
                    "AND direction = 'entry'", org)
            finally:
                await conn.close()
            print(f"database: {in_db} accepted entries, client saw {totals['accepted']} accepted", flush=True)
            if in_db != totals["accepted"] and totals["HTTP 503"]:
                print("  (the difference: scans decided after the gateway had already answered 503 for them, "
                      "as designed when a service does not answer in time; a gate's retry with the same "
                      "nonce gets that first decision)", flush=True)
            print(f"double admissions: {await double_admissions(dsn, org)}", flush=True)
        finally:
            if nc is not None:
                await nc.close()
            for dev in devices:
                await dev.close()
            for client in clients.values():
                await client.aclose()
            stop_all(gateways + scanning, 20)


if __name__ == "__main__":
    run(main())
