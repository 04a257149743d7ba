"""Deciding concurrent scans together: one database round trip for all scans that arrived while
the previous round trip was under way ("natural batching": no timer, no added latency when
idle). Up to ``in_flight`` batches of a tenant are under way at once, so the scans arriving during
one batch do not wait for it to finish: the authority locks each batch's tickets in code order,
so two batches never deadlock and a ticket in both is decided by the second after the first."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
from typing import Any, Awaitable, Callable
from uuid import UUID

from prometheus_client import Histogram

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
    """Queues scans per tenant and decides each queue's content in one call to ``decide``."""

    def __init__(self, decide: Decide, *, max_batch: int = 256, in_flight: int = 2) -> None:
        self._decide = decide
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._queues: dict[UUID, list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]] = defaultdict(list)
        self._flushing: dict[UUID, int] = defaultdict(int)  # batches under way per tenant
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, org_id: UUID, scan: dict[str, Any]) -> dict[str, Any]:
        """Decide one scan (batched with whatever else is waiting for the same tenant)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queues[org_id].append((scan, future))
        if self._flushing[org_id] < self._in_flight:
            self._flushing[org_id] += 1
            task = asyncio.create_task(self._flush(org_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _flush(self, org_id: UUID) -> None:
        try:
            while self._queues[org_id]:
                queue = self._queues[org_id]
                batch, self._queues[org_id] = queue[: self._max_batch], queue[self._max_batch :]
                scans = []
                for i, (scan, _) in enumerate(batch):
                    scan["i"] = i  # (each scan is the batcher's own dict: no copy needed)
                    scans.append(scan)
                BATCH_SIZE.observe(len(batch))
                try:
                    with BATCH_SECONDS.time():
                        decisions = await self._decide(org_id, utcnow(), scans)
                except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for decision in decisions:
                    fut = batch[decision["i"]][1]
                    if not fut.done():
                        fut.set_result(decision)
        finally:
            self._flushing[org_id] -= 1
            if not self._flushing[org_id]:
                del self._flushing[org_id]
                if not self._queues.get(org_id):
                    self._queues.pop(org_id, None)

    async def drain(self) -> None:
        """Wait for the batches under way (shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)
