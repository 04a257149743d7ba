"""What the load generators share: contexts signed before the clock starts, a garbage
collector kept out of the measurement, and a cheaper event loop.

The benches import it from their own folder (a script's folder is on ``sys.path``)."""

from __future__ import annotations

import collections
import gc
import uuid
from collections.abc import Coroutine
from typing import Any

import uvloop

from libs.actor import Actor
from libs.context import ContextSigner

__all__ = ["PresignedContexts", "run", "settle_heap"]


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a load generator on uvloop: its loop costs less CPU per request than asyncio's, CPU
    it would otherwise take from the servers and services under test on these two cores. (The
    services keep asyncio's loop: uvloop measured no gain there.)"""
    return uvloop.run(main)


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
