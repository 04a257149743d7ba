"""Payments' background work, run by every replica: release lapsed holds and resume
interrupted sagas.

Safe with any number of replicas without a leader: expiring a checkout locks its row with
``FOR UPDATE SKIP LOCKED`` (a replica skips what another is already expiring, a buyer's
concurrent completion waits on the row and then finds it expired) and resuming a saga needs the
checkout's saga lock (a replica skips sagas someone else is driving).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from uuid import UUID

from prometheus_client import Counter

from libs.background import cancel_and_wait
from libs.actor import Actor
from libs.contracts.payments import CheckoutExpired
from libs.envelope import utcnow
from libs.log import get_logger
from libs.outbox import add_events
from services.payments.adapters.postgres import PaymentsStore
from services.payments.domain.checkout import CheckoutStatus
from services.payments.saga import SERVICE, CheckoutSaga

__all__ = ["Sweeper"]

log = get_logger(__name__)

HOLDS_EXPIRED = Counter("vge_payments_checkouts_expired_total", "Checkouts whose holds lapsed")


class Sweeper:
    """Every ``interval_seconds``: expire lapsed checkouts, then resume idle unfinished sagas."""

    def __init__(
        self,
        store: PaymentsStore,
        saga: CheckoutSaga,
        *,
        interval_seconds: float = 5.0,
        resume_idle_seconds: float = 10.0,
        batch_size: int = 500,
        concurrency: int = 4,
    ) -> None:
        """``resume_idle_seconds``: a saga untouched that long is presumed interrupted (a live
        runner holds its lock anyway, so a wrong guess only costs a skipped try)."""
        self.store = store
        self.saga = saga
        self.interval_seconds = interval_seconds
        self.resume_idle_seconds = resume_idle_seconds
        self.batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None

    async def expire_due(self) -> int:
        """Release the holds of every lapsed pending checkout; returns how many expired."""
        due = await self.store.due_expiries(self.batch_size)
        by_tenant: dict[UUID, list[UUID]] = defaultdict(list)
        for org_id, checkout_id in due:
            by_tenant[org_id].append(checkout_id)
        expired = 0
        for org_id, ids in by_tenant.items():
            actor = Actor.system("payments.hold-expiry", org_id)
            async with self.store.transaction(org_id) as conn:
                checkouts = await self.store.lock_expired(conn, ids)
                when = utcnow()
                for c in checkouts:
                    await self.store.release_holds(conn, c)
                    await self.store.move(conn, c, CheckoutStatus.EXPIRED)
                await add_events(
                    conn,
                    SERVICE,
                    [
                        CheckoutExpired(
                            checkout_id=c.checkout_id, event_id=c.event_id, expired_at=when
                        ).envelope(org_id, actor, str(c.checkout_id))
                        for c in checkouts
                    ],
                )
            expired += len(checkouts)
        if expired:
            HOLDS_EXPIRED.inc(expired)
            log.info("holds_expired", checkouts=expired)
        return expired

    async def resume_unfinished(self, idle_seconds: float | None = None) -> int:
        """Resume every unfinished saga idle for ``idle_seconds`` (default: the configured
        idleness; 0 at startup: all of them). Returns how many were carried on."""
        idle = self.resume_idle_seconds if idle_seconds is None else idle_seconds
        todo = await self.store.unfinished_sagas(idle, self.batch_size)

        async def one(org_id: UUID, checkout_id: UUID) -> bool:
            async with self._slots:
                try:
                    return await self.saga.resume(org_id, checkout_id) is not None
                except Exception as exc:  # noqa: BLE001 - one bad saga must not stop the rest
                    log.exception("saga_resume_failed", checkout_id=str(checkout_id), error=repr(exc))
                    return False

        results = await asyncio.gather(*(one(o, c) for o, c in todo))
        if todo:
            log.info("sagas_resumed", found=len(todo), carried_on=sum(results))
        return sum(results)

    def start(self) -> None:
        """Run the sweep in the background until ``stop``."""
        self._task = asyncio.create_task(self._run(), name="payments-hold-sweeper")

    async def stop(self) -> None:
        """Stop after the current pass."""
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.expire_due()
                await self.resume_unfinished()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep sweeping (database blips)
                log.warning("hold_sweep_failed", error=repr(exc))
