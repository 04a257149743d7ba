"""What the load generators share: the servers, the services' environment, contexts
signed before the clock starts, a garbage collector kept out of the measurement, a cheaper event
loop, and requests without a future each.

The benches import it from their own folder (a script's folder is on ``sys.path``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvloop
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from libs.actor import Actor
from libs.context import ContextSigner
from libs.servers import resolve_server_urls
from libs.settings import Settings

__all__ = [
    "OnReply", "PresignedContexts", "ReplyInbox", "at_fixed_rate", "bench_servers", "percentile", "run",
    "send_at_fixed_rate", "service_env", "settle_heap",
]


@contextlib.contextmanager
def bench_servers(name: str, settings: Settings, *,
                  fsync: bool = True) -> Iterator[tuple[dict[str, str], Path]]:
    """The servers' URLs for a bench, and the folder of those started here: the URLs configured
    (``VGE_*_URL``), the rest started in a fresh folder, and stopped, with their data deleted, at
    the end (a run leaves gigabytes)."""
    data = Path(tempfile.mkdtemp(prefix=f"vge-bench-{name}-"))
    try:
        urls, servers = resolve_server_urls(settings, data, allow_docker=False, fsync=fsync)
        try:
            yield urls, data
        finally:
            if servers is not None:
                servers.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def service_env(urls: dict[str, str], public_key: str) -> dict[str, str]:
    """The environment of a service process a bench starts: this process's, the servers' URLs,
    the key that verifies the load generator's signed contexts, and warnings only in its log."""
    return {**os.environ, "VGE_NATS_URL": urls["nats_url"], "VGE_DATABASE_URL": urls["database_url"],
            "VGE_REDIS_URL": urls["redis_url"], "VGE_CONTEXT_PUBLIC_KEYS": public_key,
            "VGE_LOG_LEVEL": "WARNING"}


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank, p from 0 to 100) of ``values``, in their unit; NaN for
    none. One definition, so the benches' p99s can be compared."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a load generator on uvloop: its loop costs less CPU per request than asyncio's, CPU
    it would otherwise take from the servers and services under test on these two cores. (The
    services keep asyncio's loop: uvloop measured no gain there.)"""
    return uvloop.run(main)


async def send_at_fixed_rate(rate: float, total: int, send: Callable[[int, float], Awaitable[None]]) -> int:
    """Call ``send(i, due)`` for i = 0 ... ``total - 1`` at ``rate`` per second from now, each
    awaited in turn: for a ``send`` that only sends (``ReplyInbox.send``); ``at_fixed_rate`` is
    for one that waits for its reply. ``due`` is when request i should go (``perf_counter``):
    an open loop counts latency from there, so a load generator running late cannot hide the
    wait in its own queue. Returns how many were sent more than 5 ms late."""
    late = 0
    t0 = time.perf_counter()
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        await send(i, due)
    return late


async def at_fixed_rate(rate: float, total: int,
                        send: Callable[[int, float], Coroutine[Any, Any, None]]) -> int:
    """Start ``send(i, due)`` for i = 0 ... ``total - 1`` at ``rate`` per second from now, each
    on its own task (open loop: a slow reply never delays the next request), and wait for the
    last one. ``due`` as in ``send_at_fixed_rate``. Returns how many started more than 5 ms late.

    Only the requests still in flight are awaited at the end: a gather over every task of the
    phase (10,000+) put a done-callback per task on the loop in one go, ~20 ms during which the
    replies of the last requests waited, counted as that much slower."""
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    async def start(i: int, due: float) -> None:
        task = asyncio.create_task(send(i, due))
        in_flight.add(task)
        task.add_done_callback(done)

    late = await send_at_fixed_rate(rate, total, start)
    while in_flight:
        await asyncio.wait(set(in_flight))
    if failures:
        raise failures[0]
    return late


OnReply = Callable[[Msg | None, float], Awaitable[None]]


class ReplyInbox:
    """Core NATS requests whose replies all come to one subscription, each handed to the
    callback sent with its request, with the time it took (``None`` for a request unanswered
    after ``timeout``).

    Why not nats-py's ``request``: it makes a future, an inbox token and a ``wait_for`` timer
    per request, and a load generator awaiting it needs a task per request in flight. That is
    CPU taken from the service under test on these two cores, and more so at a fixed rate,
    where every request is a wake-up of its own. The service sees the same messages either way:
    a request with a reply subject and headers."""

    def __init__(self, nc: NatsClient, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = ""
        self._sent = 0
        # reply subject -> (sent at, callback); dicts keep insertion order, so the oldest
        # requests come first (the sweep stops at the first one still in time)
        self._waiting: dict[str, tuple[float, OnReply]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the replies; call before the first ``send``."""
        self._prefix = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        """Stop timing requests out and unsubscribe (replies still on their way are dropped)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def send(self, subject: str, payload: bytes, headers: dict[str, str], on_reply: OnReply,
                   *, due: float | None = None) -> None:
        """Send one request; ``on_reply`` is awaited with its reply (or ``None``) and its latency,
        counted from ``due`` (``perf_counter``; default: now)."""
        self._sent += 1
        reply = f"{self._prefix}{self._sent}"
        self._waiting[reply] = (time.perf_counter() if due is None else due, on_reply)
        await self._nc.publish(subject, payload, reply=reply, headers=headers)

    async def drained(self) -> None:
        """Wait until every request sent has been answered or has timed out."""
        while self._waiting:
            await asyncio.sleep(0.005)

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject, None)
        if entry is not None:  # (None: it timed out before its reply came)
            sent_at, on_reply = entry
            await on_reply(msg, time.perf_counter() - sent_at)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            expired_before = time.perf_counter() - self._timeout
            for reply, (sent_at, on_reply) in list(self._waiting.items()):
                if sent_at > expired_before:
                    break
                del self._waiting[reply]
                await on_reply(None, time.perf_counter() - sent_at)


def settle_heap() -> None:
    """Call before a measured phase: collect once, then freeze what the set-up built (tickets,
    presigned contexts), so the load generator's own full collections stop walking it. Each one
    took ~30 ms with that heap, and every request in flight during it was counted as that much
    slower (seen as a stall of all replies at once, at the moment of the client's collection).
    The services do the same after their start-up (``ServiceRuntime._tune_gc``)."""
    gc.collect()
    gc.freeze()


class PresignedContexts:
    """A signer whose contexts were signed before the clock started (``--presign``): the load
    generator then spends its CPU on sending scans, not on the gateway's Ed25519 signing, which
    shares these two cores with the service under test (bench_http_scan.py measures the gateway
    with its signing). Falls back to signing on the spot when a pool runs dry."""

    def __init__(self, signer: ContextSigner) -> None:
        self._signer = signer
        self._pools: dict[tuple[str, str], collections.deque[tuple[Any, str]]] = {}

    def fill(self, actors: list[Actor], org: uuid.UUID, subject: str, per_actor: int, ttl: float) -> None:
        for actor in actors:
            pool = self._pools.setdefault((actor.user_id, subject), collections.deque())
            for _ in range(per_actor):
                pool.append(self._signer.issue(actor=actor, org_id=org, subject=subject,
                                               correlation_id=uuid.uuid4().hex, ttl_seconds=ttl))

    def issue(self, *, actor: Actor, org_id: Any, subject: str, correlation_id: str,
              ttl_seconds: float) -> tuple[Any, str]:
        pool = self._pools.get((actor.user_id, subject))
        if pool:
            return pool.popleft()
        return self._signer.issue(actor=actor, org_id=org_id, subject=subject,
                                  correlation_id=correlation_id, ttl_seconds=ttl_seconds)
