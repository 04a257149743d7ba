"""Payments' per-tenant batching: queued work goes together, at most ``in_flight`` batches at once."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from services.payments.adapters.postgres import _TenantBatches

ORG = uuid.uuid4()


@dataclass
class Work:
    n: int
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


async def test_two_batches_under_way_and_the_rest_together_after():
    calls: list[list[int]] = []
    gate = asyncio.Event()

    async def many(org, batch):
        calls.append([w.n for w in batch])
        await gate.wait()
        return [w.n * 10 for w in batch]

    async def one(org, w):
        calls.append([w.n])
        await gate.wait()
        return w.n * 10

    batches = _TenantBatches("test", many, one, lambda w, outcome: outcome, limit=100,
                             interrupted="interrupted", in_flight=2)
    work = [Work(n) for n in range(12)]
    batches.submit(ORG, work[0])
    await asyncio.sleep(0)
    batches.submit(ORG, work[1])
    await asyncio.sleep(0)
    for w in work[2:]:
        batches.submit(ORG, w)
    await asyncio.sleep(0)
    assert calls == [[0], [1]], "two under way; the other ten wait"
    gate.set()
    assert await asyncio.gather(*(w.result for w in work)) == [n * 10 for n in range(12)]
    assert sorted(map(len, calls)) == [1, 1, 10]


async def test_cancelled_runners_leave_nobody_waiting():
    async def many(org, batch):
        await asyncio.Event().wait()

    async def one(org, w):
        await asyncio.Event().wait()

    batches = _TenantBatches("test", many, one, lambda w, outcome: outcome, limit=100,
                             interrupted="interrupted", in_flight=2)
    work = [Work(n) for n in range(5)]
    for w in work:
        batches.submit(ORG, w)
        await asyncio.sleep(0)
    for task in list(batches._runners[ORG]):
        task.cancel()
    outcomes = await asyncio.gather(*(w.result for w in work), return_exceptions=True)
    assert all(type(o).__name__ == "Unavailable" for o in outcomes), outcomes
