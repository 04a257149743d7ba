"""Per-tenant natural batching (libs.batching): queued work goes together, at most
``in_flight`` batches at once, and every submitter gets an answer whatever the batch does."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from libs.batching import TenantBatches
from libs.errors import Unavailable

ORG = uuid.uuid4()


def _held_batches(calls: list[list[int]], gate: asyncio.Event):
    """A ``many`` that records each batch and answers (n * 10 each) once ``gate`` opens."""

    async def many(org, batch):
        calls.append(list(batch))
        await gate.wait()
        return [n * 10 for n in batch]

    return many


async def test_two_batches_under_way_and_the_rest_together_after():
    calls: list[list[int]] = []
    gate = asyncio.Event()
    many = _held_batches(calls, gate)

    async def one(org, n):
        calls.append([n])
        await gate.wait()
        return n * 10

    batches: TenantBatches[int] = TenantBatches("test", many, one=one, in_flight=2)
    results = [batches.submit(ORG, 0)]
    await asyncio.sleep(0)
    results.append(batches.submit(ORG, 1))
    await asyncio.sleep(0)
    results += [batches.submit(ORG, n) for n in range(2, 12)]
    await asyncio.sleep(0)
    assert calls == [[0], [1]], "two under way; the other ten wait"
    gate.set()
    assert await asyncio.gather(*results) == [n * 10 for n in range(12)]
    assert sorted(map(len, calls)) == [1, 1, 10]


async def test_a_second_batch_starts_only_for_a_backlog():
    calls: list[list[int]] = []
    gate = asyncio.Event()
    batches: TenantBatches[int] = TenantBatches("test", _held_batches(calls, gate), in_flight=2,
                                                parallel_from=3)
    results = [batches.submit(ORG, 0)]
    await asyncio.sleep(0)
    results += [batches.submit(ORG, n) for n in (1, 2)]
    await asyncio.sleep(0)
    assert calls == [[0]], "two waiting are no backlog: they wait for the running batch"
    results.append(batches.submit(ORG, 3))
    await asyncio.sleep(0)
    assert calls == [[0], [1, 2, 3]], "the third waiting one starts a batch beside it"
    gate.set()
    assert await asyncio.gather(*results) == [n * 10 for n in range(4)]


async def test_tenants_are_batched_apart():
    calls: list[tuple[uuid.UUID, list[int]]] = []
    gate = asyncio.Event()

    async def many(org, batch):
        calls.append((org, list(batch)))
        await gate.wait()
        return batch

    other = uuid.uuid4()
    batches: TenantBatches[int] = TenantBatches("test", many)
    results = [batches.submit(ORG, 1), batches.submit(other, 2), batches.submit(ORG, 3)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*results) == [1, 2, 3]
    assert sorted(calls, key=lambda c: c[1]) == [(ORG, [1, 3]), (other, [2])]


async def test_an_exception_outcome_is_raised_to_its_submitter_only():
    async def many(org, batch):
        return [ValueError(n) if n == 2 else n for n in batch]

    batches: TenantBatches[int] = TenantBatches("test", many)
    outcomes = await asyncio.gather(*(batches.submit(ORG, n) for n in range(4)), return_exceptions=True)
    assert outcomes[:2] == [0, 1] and outcomes[3] == 3
    assert isinstance(outcomes[2], ValueError)


async def test_without_one_a_failed_batch_is_every_members_error_and_the_next_goes_on():
    fail = True

    async def many(org, batch):
        if fail:
            raise RuntimeError("database down")
        return batch

    batches: TenantBatches[int] = TenantBatches("test", many)
    outcomes = await asyncio.gather(*(batches.submit(ORG, n) for n in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    fail = False
    assert await batches.submit(ORG, 7) == 7


async def test_with_one_a_failed_batch_is_retried_member_by_member():
    alone: list[int] = []

    async def many(org, batch):
        raise RuntimeError("one bad member spoils the statement")

    async def one(org, n):
        alone.append(n)
        if n == 1:
            raise ValueError("the bad member")
        return n

    batches: TenantBatches[int] = TenantBatches("test", many, one=one)
    outcomes = await asyncio.gather(*(batches.submit(ORG, n) for n in range(3)), return_exceptions=True)
    assert outcomes[0] == 0 and outcomes[2] == 2 and isinstance(outcomes[1], ValueError)
    assert sorted(alone) == [0, 1, 2]


@pytest.mark.parametrize("with_one", [False, True])
async def test_too_few_outcomes_leave_nobody_waiting(with_one):
    async def many(org, batch):
        return batch[:-1]  # a bug: one outcome short

    async def one(org, n):
        return n

    batches: TenantBatches[int] = TenantBatches("test", many, one=one if with_one else None)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(batches.submit(ORG, n) for n in range(3)), return_exceptions=True), 2.0
    )
    if with_one:
        assert outcomes == [0, 1, 2]
    else:
        assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes


async def test_accept_turns_a_batch_outcome_into_the_answer():
    async def many(org, batch):
        return [n % 2 == 0 for n in batch]

    async def one(org, n):
        return "alone"

    batches: TenantBatches[int] = TenantBatches(
        "test", many, one=one, accept=lambda n, even: n if even else LookupError(n)
    )
    outcomes = await asyncio.gather(*(batches.submit(ORG, n) for n in range(4)), return_exceptions=True)
    assert outcomes[0] == 0 and outcomes[2] == 2
    assert isinstance(outcomes[1], LookupError) and isinstance(outcomes[3], LookupError)


async def test_cancelled_runners_leave_nobody_waiting():
    async def many(org, batch):
        await asyncio.Event().wait()

    async def one(org, n):
        await asyncio.Event().wait()

    batches: TenantBatches[int] = TenantBatches("test", many, one=one, in_flight=2,
                                                interrupted="interrupted")  # fmt: skip
    results = []
    for n in range(5):
        results.append(batches.submit(ORG, n))
        await asyncio.sleep(0)
    for task in list(batches._runners[ORG]):
        task.cancel()
    outcomes = await asyncio.gather(*results, return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes


async def test_drain_waits_for_the_batches_under_way():
    gate = asyncio.Event()
    done: list[int] = []

    async def many(org, batch):
        await gate.wait()
        done.extend(batch)
        return batch

    batches: TenantBatches[int] = TenantBatches("test", many)
    result = batches.submit(ORG, 1)
    await asyncio.sleep(0)
    asyncio.get_running_loop().call_later(0.05, gate.set)
    await batches.drain()
    assert done == [1] and result.done()


async def test_background_writes_added_during_a_write_go_together_in_the_next():
    from libs.batching import BackgroundBatches

    writes: list[list[int]] = []
    release = asyncio.Event()

    async def write(items: list[int]) -> None:
        writes.append(items)
        await release.wait()

    background = BackgroundBatches("numbers", write)
    background.add([1])
    await asyncio.sleep(0)  # the first write is under way
    background.add([2, 3])
    background.add([])
    background.add([4])
    assert writes == [[1]]
    release.set()
    await background.drain()
    assert writes == [[1], [2, 3, 4]]


async def test_background_writes_linger_for_more_items():
    from libs.batching import BackgroundBatches

    writes: list[list[int]] = []

    async def write(items: list[int]) -> None:
        writes.append(items)

    background = BackgroundBatches("numbers", write, linger=0.05)
    background.add([1])
    await asyncio.sleep(0.01)
    background.add([2])
    assert writes == [], "nothing written while the write lingers"
    await background.drain()
    assert writes == [[1, 2]]


async def test_a_failed_background_write_is_logged_and_the_next_one_still_runs():
    from structlog.testing import capture_logs

    from libs.batching import BackgroundBatches

    writes: list[list[str]] = []

    async def write(items: list[str]) -> None:
        writes.append(items)
        if items == ["bad"]:
            raise RuntimeError("boom")

    background = BackgroundBatches("words", write)
    with capture_logs() as logs:
        background.add(["bad"])
        await background.drain()
        background.add(["good"])
        await background.drain()
    assert writes == [["bad"], ["good"]]
    assert [e["event"] for e in logs] == ["words_failed"] and logs[0]["size"] == 1
