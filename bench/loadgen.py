"""What the load generators share: contexts signed before the clock starts, a garbage
collector kept out of the measurement, and a cheaper event loop.

The benches import it from their own folder (a script's folder is on ``sys.path``)."""

from __future__ import annotations

import asyncio
import collections
import gc
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from libs.actor import Actor
from libs.context import ContextSigner

__all__ = ["PresignedContexts", "at_fixed_rate", "percentile", "run", "settle_heap"]


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


async def at_fixed_rate(rate: float, total: int, send: Callable[[int], Coroutine[Any, Any, None]]) -> int:
    """Start ``send(0)`` ... ``send(total - 1)`` at ``rate`` per second from now, each on its
    own (open loop: a slow reply never delays the next request), and wait for the last one.
    Returns how many started more than 5 ms late (the load generator could not keep up).

    Only the requests still in flight are awaited at the end: a gather over every task of the
    phase (10,000+) put a done-callback per task on the loop in one go, ~20 ms during which the
    replies of the last requests waited, counted as that much slower."""
    in_flight: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    late = 0
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        task = asyncio.create_task(send(i))
        in_flight.add(task)
        task.add_done_callback(done)
    while in_flight:
        await asyncio.wait(set(in_flight))
    if failures:
        raise failures[0]
    return late


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
