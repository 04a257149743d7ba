"""Work of one tenant that arrives together goes to the database together ("natural
batching": no timer, so nothing waits when the service is idle).

While a tenant's batch is under way, the next requests queue; when it ends they go as the next
batch. Up to ``in_flight`` batches of a tenant may be under way at once (more than one only
for work whose batches cannot deadlock, e.g. because each locks its rows in one order); with
``parallel_from``, a further batch starts beside a running one only once that many requests
wait (a backlog), not for every request that finds the first batch busy. Both scanning (scan
decisions) and payments (checkout creation and completion) batch this way.

Every submitter gets its own answer, whatever happens to the batch: its outcome, its own error,
the batch's error, or ``Unavailable`` if the batch was interrupted (shutdown). Nobody is left
waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar
from uuid import UUID

from libs.errors import Unavailable
from libs.log import get_logger

__all__ = ["TenantBatches", "BackgroundBatches"]

log = get_logger(__name__)

T = TypeVar("T")


class TenantBatches(Generic[T]):
    """Per-tenant queues of ``T`` items, each queue's content handled by one call to ``many``.

    ``many(org_id, items)`` returns one outcome per item, in order; an outcome that is an
    exception is raised to that item's submitter. With ``one(org_id, item)``, an item alone is
    handled by ``one``, and when ``many`` fails its items are retried one by one, so each gets
    its own answer; without it, a lone item goes through ``many`` too and a failure of ``many``
    is every member's. ``accept(item, outcome)`` turns a batch outcome into the answer."""

    def __init__(
        self,
        what: str,
        many: Callable[[UUID, list[T]], Awaitable[Sequence[Any]]],
        *,
        one: Callable[[UUID, T], Awaitable[Any]] | None = None,
        accept: Callable[[T, Any], Any] | None = None,
        limit: int = 256,
        in_flight: int = 1,
        parallel_from: int = 1,
        interrupted: str = "interrupted; retry",
    ) -> None:
        """``what`` names the work in logs; ``limit`` caps a batch; ``parallel_from``: how many
        items must be queued for a batch to start beside the ones under way (the first batch of
        an idle tenant starts at once); ``interrupted`` is the message of the ``Unavailable`` a
        submitter gets if its batch is cancelled."""
        self._what = what
        self._many = many
        self._one = one
        self._accept = accept
        self._limit = limit
        self._in_flight = in_flight
        self._parallel_from = parallel_from
        self._interrupted = interrupted
        self._queued: dict[UUID, list[tuple[T, asyncio.Future[Any]]]] = {}
        self._runners: dict[UUID, set[asyncio.Task[None]]] = {}

    def submit(self, org_id: UUID, item: T) -> asyncio.Future[Any]:
        """Queue ``item``; the future is settled when its batch is done."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        queued = self._queued.setdefault(org_id, [])
        queued.append((item, result))
        runners = self._runners.setdefault(org_id, set())
        if len(runners) < self._in_flight and (not runners or len(queued) >= self._parallel_from):
            runners.add(asyncio.create_task(self._drain(org_id), name=f"{self._what}-batches"))
        return result

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) for the batches under way (shutdown)."""
        tasks = [t for runners in self._runners.values() for t in runners]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _drain(self, org_id: UUID) -> None:
        batch: list[tuple[T, asyncio.Future[Any]]] = []
        try:
            while batch := self._queued.pop(org_id, []):
                if len(batch) > self._limit:
                    self._queued[org_id] = batch[self._limit :] + self._queued.get(org_id, [])
                    batch = batch[: self._limit]
                if self._one is None or len(batch) > 1:
                    await self._together(org_id, batch)
                else:
                    await self._one_by_one(org_id, batch)
                batch = []
        finally:
            runners = self._runners.get(org_id, set())
            runners.discard(asyncio.current_task())  # type: ignore[arg-type]
            # (only if this task was cancelled: nobody is left waiting forever; what is still
            # queued is another runner's, unless this was the last one)
            left = batch + (self._queued.pop(org_id, []) if not runners else [])
            if not runners:
                self._runners.pop(org_id, None)
            for _, result in left:
                _settle(result, Unavailable(self._interrupted))

    async def _together(self, org_id: UUID, batch: list[tuple[T, asyncio.Future[Any]]]) -> None:
        items = [item for item, _ in batch]
        try:
            outcomes = await self._many(org_id, items)
            if len(outcomes) != len(items):  # a bug, but nobody may wait forever for it
                raise RuntimeError(f"{self._what}: {len(outcomes)} outcomes for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - each submitter gets an answer
            log.warning(f"{self._what}_batch_failed", size=len(batch), error=repr(exc))
            if self._one is None:
                for _, result in batch:
                    _settle(result, exc)
            else:
                await self._one_by_one(org_id, batch)
            return
        accept = self._accept
        for (item, result), outcome in zip(batch, outcomes):
            _settle(result, outcome if accept is None else accept(item, outcome))

    async def _one_by_one(self, org_id: UUID, batch: list[tuple[T, asyncio.Future[Any]]]) -> None:
        assert self._one is not None
        one = self._one
        outcomes = await asyncio.gather(*(one(org_id, item) for item, _ in batch),
                                        return_exceptions=True)  # fmt: skip
        for (_, result), outcome in zip(batch, outcomes):
            _settle(result, outcome)


class BackgroundBatches(Generic[T]):
    """Work nobody waits for, a batch at a time: items added while a batch is under way go
    together in the next one. For writes or reads that only save later work or protect capacity
    (tier-2 admission claims and lookups, rate-limit counts): a batch that fails is logged as
    ``<what>_failed`` and its items are dropped, never retried, never raised to anyone."""

    def __init__(self, what: str, handle: Callable[[list[T]], Awaitable[None]], *, linger: float = 0.0) -> None:
        """``handle(items)`` handles the items added since the last batch, in the order added;
        ``linger``: seconds a batch waits for more items before it starts (fewer, bigger batches
        for items that may be handled that much later)."""
        self._what = what
        self._handle = handle
        self._linger = linger
        self._items: list[T] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, items: Sequence[T]) -> None:
        """Queue ``items`` for the next batch (started now if none is under way)."""
        self._items.extend(items)
        if self._items and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._what}-batches")

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (up to ``timeout``) for the batches queued so far (shutdown)."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)

    async def _run(self) -> None:
        while self._items:
            if self._linger:
                await asyncio.sleep(self._linger)
            items, self._items = self._items, []
            try:
                await self._handle(items)
            except Exception as exc:  # noqa: BLE001 - logged, never fatal
                log.warning(f"{self._what}_failed", size=len(items), error=repr(exc))


def _settle(result: asyncio.Future[Any], outcome: Any) -> None:
    if result.done():
        return
    if isinstance(outcome, asyncio.CancelledError):  # (shutting down) not the waiter's own
        result.set_exception(Unavailable("interrupted; retry"))
    elif isinstance(outcome, BaseException):
        result.set_exception(outcome)
    else:
        result.set_result(outcome)
