"""Deciding concurrent scans together: one database round trip for all scans that arrived while
the previous round trip was under way ("natural batching": no timer, no added latency when
idle). Under a backlog (``parallel_from`` scans waiting) a further batch of the tenant starts
beside the ones under way, up to ``in_flight``, so a burst does not wait for one batch at a
time: the authority locks each batch's tickets in code order, so batches never deadlock and a
ticket in two is decided by the later after the earlier.

Three under way, not two: a backlog (scans that queued while the service was busy for a
moment, e.g. with an outbox relay pass) is worked off sooner. bench/bench_scan.py, 5 pairs
(--seconds 8, --rate-seconds 8-10): p99 at 1,000/s 9.0 ms mean (8.7-9.7) against 9.6
(9.0-10.7); flat out p99 27.5-28.1 against 28.0-32.0 ms; flat-out throughput the same within
noise (3,614-3,777 against 3,594-3,736/s).

Why not a second batch for every scan that finds the first busy: at a steady 1,000 scans/s that
made batches of ~2 scans, and each batch costs the service and PostgreSQL about as much as
its scans do (a round trip, a transaction, a commit). Waiting for the running batch instead
gives batches of ~3 and a less busy machine; measured with bench/bench_scan.py: p95 at
1,000/s 9.1-9.7 -> 8.2-8.8 ms, p99 11-11.7 -> 10.4-11.3 ms, flat out unchanged."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Awaitable, Callable
from uuid import UUID

from prometheus_client import Histogram

from libs.batching import TenantBatches
from libs.envelope import utcnow

__all__ = ["DecisionBatcher"]

BATCH_SIZE = Histogram(
    "vge_scan_batch_size", "Scans decided per database round trip",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

BATCH_SECONDS = Histogram(
    "vge_scan_batch_seconds", "Time to decide one batch of scans (tiers 2 and 3)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

Decide = Callable[[UUID, datetime, list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]


class DecisionBatcher:
    """Queues scans per tenant and decides each queue's content in one call to ``decide``
    (``libs.batching``); a failed call is every waiting scan's error."""

    def __init__(self, decide: Decide, *, max_batch: int = 256, in_flight: int = 3,
                 parallel_from: int = 8) -> None:
        self._decide = decide
        self._batches: TenantBatches[dict[str, Any]] = TenantBatches(
            "decide", self._decide_batch, limit=max_batch, in_flight=in_flight,
            parallel_from=parallel_from, interrupted="scan not decided; retry")  # fmt: skip

    async def submit(self, org_id: UUID, scan: dict[str, Any]) -> dict[str, Any]:
        """Decide one scan (batched with whatever else is waiting for the same tenant)."""
        return await self._batches.submit(org_id, scan)

    async def drain(self) -> None:
        """Wait for the batches under way (shutdown)."""
        await self._batches.drain()

    async def _decide_batch(self, org_id: UUID, scans: list[dict[str, Any]]) -> list[Any]:
        for i, scan in enumerate(scans):
            scan["i"] = i  # (each scan is the batcher's own dict: no copy needed)
        BATCH_SIZE.observe(len(scans))
        with BATCH_SECONDS.time():
            decisions = await self._decide(org_id, utcnow(), scans)
        # the decisions come in the authority's order: put each at its scan's place
        outcomes: list[Any] = [None] * len(scans)
        for decision in decisions:
            outcomes[decision["i"]] = decision
        if any(o is None for o in outcomes):
            raise RuntimeError(f"{len(decisions)} decisions for {len(scans)} scans")
        return outcomes
