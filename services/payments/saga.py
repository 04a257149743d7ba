"""The checkout saga: hold -> charge -> post the sale -> issue tickets -> events, and its
compensation and refund paths.

Every step commits its new state (and the events it causes, through the outbox) before the next
one starts, so a crash anywhere leaves a state the saga resumes from (``resume``; run at
startup and by the periodic sweep). The steps that must be durable on their own are the intent
(``charging``, committed before the processor is called) and, when something fails after the
charge, ``compensating`` with the charge (committed before the refund). Recording a successful
charge, booking the sale, issuing the tickets and queueing the events are one transaction
(``charging -> completed``, one statement): a crash before it commits leaves ``charging``, and
the charge is found by its idempotency key. One runner at a time drives a checkout: it holds the
checkout's saga lock (a PostgreSQL session advisory lock, released when the runner's connection
closes, crash included).

Money rules kept on every path:

* the processor is called with the checkout id as idempotency key, so a checkout is charged at
  most once, whatever is retried;
* ``charging`` is committed before the charge; a timeout (or a crash) is settled by looking the
  charge up by that key: found -> refunded (timeout) or carried on (crash), not found -> failed;
* once money may have been taken, every failure goes through ``compensating``: refund the
  charge, reverse any posted entry, release the holds. No tickets without money, no money
  without tickets or a refund.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from uuid import UUID

import asyncpg
from prometheus_client import Counter

from libs.actor import Actor
from libs.contracts.catalog import TicketCancelled, TicketIssued
from libs.contracts.payments import (
    CheckoutCompleted,
    CheckoutCompletion,
    CheckoutFailed,
    CheckoutRefund,
    IssuedTicket,
    LedgerEntryPosted,
    LedgerLine,
    RefundCompleted,
)
from libs.db import CONNECTION_ERRORS
from libs.envelope import Envelope, new_id, utcnow
from libs.errors import Conflict, NotFound, Unavailable
from libs.log import get_logger
from libs.outbox import add_events
from services.payments.adapters.faults import InjectedFailure, SagaFaults
from services.payments.adapters.postgres import (
    CheckoutRecord,
    CompletionClaim,
    LostRace,
    PaymentsStore,
    SagaBusy,
    SagaSession,
)
from services.payments.adapters.processor import (
    PaymentDeclined,
    PaymentProcessor,
    ProcessorTimeout,
    ProcessorUnavailable,
)
from services.payments.domain.checkout import (
    CheckoutStatus,
    FailureReason,
    SagaStep,
    next_step,
)
from services.payments.domain.ledger import JournalEntry, UnbalancedEntry, reversal_of, sale_entry
from services.payments.domain.tickets import new_ticket_code

__all__ = ["CheckoutSaga", "SagaWaiting", "SERVICE"]

SERVICE = "payments"
log = get_logger(__name__)

SAGA_OUTCOMES = Counter(
    "vge_payments_saga_outcomes_total", "Checkout sagas that ended, by outcome", ["outcome"]
)
SAGA_RESUMED = Counter("vge_payments_sagas_resumed_total", "Sagas resumed after an interruption")

_S = CheckoutStatus


class SagaWaiting(Exception):
    """The saga cannot go on right now (processor or database unreachable); its state is
    persisted and the resumer tries again later."""


def _processor_key(checkout_id: UUID) -> str:
    # One charge per checkout, ever: the key is the checkout, not the buyer's Idempotency-Key.
    return f"checkout:{checkout_id}"


def _entry_event(entry: JournalEntry, posted_at: datetime) -> LedgerEntryPosted:
    return LedgerEntryPosted(
        entry_id=entry.entry_id,
        reference_type=entry.reference_type,
        reference_id=entry.reference_id,
        reverses_entry_id=entry.reverses_entry_id,
        lines=[
            LedgerLine(account=l.account, side=l.side.value, amount=l.amount.amount,
                       currency=l.amount.currency)  # fmt: skip
            for l in entry.lines
        ],
        posted_at=posted_at,
    )


class CheckoutSaga:
    """Drives checkouts through payment, booking, ticketing, compensation and refunds."""

    def __init__(
        self,
        store: PaymentsStore,
        processor: PaymentProcessor,
        faults: SagaFaults | None = None,
        *,
        platform_fee_bps: int = 0,
        busy_wait_seconds: float = 5.0,
        charge_grace_seconds: float = 30.0,
    ) -> None:
        """``busy_wait_seconds``: how long a repeated request waits for the runner that holds
        the checkout. ``charge_grace_seconds``: how long an interrupted ``charging`` saga with
        no charge found is left alone (a charge request may still be in flight) before it is
        closed as ``interrupted``."""
        self.store = store
        self.processor = processor
        self.faults = faults or SagaFaults()
        self.platform_fee_bps = platform_fee_bps
        self.busy_wait_seconds = busy_wait_seconds
        self.charge_grace_seconds = charge_grace_seconds

    # -- entry points -----------------------------------------------------------------------

    async def complete(
        self,
        org_id: UUID,
        checkout_id: UUID,
        *,
        payment_token: str,
        idempotency_key: str,
        actor: Actor,
        correlation_id: str,
        causation_id: str | None,
    ) -> CheckoutCompletion:
        """Pay for a pending checkout and issue its tickets; a repeat with the same
        Idempotency-Key returns the first result and charges nothing more."""
        claim = CompletionClaim(idempotency_key, actor, correlation_id, causation_id)
        try:
            async with self._locked(org_id, checkout_id, claim) as (session, c):
                if session.claimed:  # pending -> charging, committed: the intent is durable
                    self.faults.after("charging")
                elif c.completion_key is None:
                    if c.status is not _S.PENDING:
                        raise Conflict(f"checkout is {c.status}", reason=str(c.status))
                    # still pending, not claimed: the holds lapsed (database clock)
                    raise Conflict("checkout expired; its tickets were released",
                                   reason="expired")  # fmt: skip
                elif c.completion_key != idempotency_key:
                    raise Conflict(
                        "checkout is already completed or being completed with another "
                        "Idempotency-Key", reason="already_completing",
                    )  # fmt: skip
                elif c.completion is not None:  # a repeat: the first result
                    return CheckoutCompletion.model_validate(c.completion)
                c = await self._drive_or_wait(session, c, payment_token)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(
                "this Idempotency-Key was used for another checkout",
                reason="idempotency_key_reused",
            ) from exc
        if c.completion is None:
            raise Unavailable("completion is still in progress; retry with the same "
                              "Idempotency-Key", reason="in_progress")  # fmt: skip
        return CheckoutCompletion.model_validate(c.completion)

    async def refund(
        self,
        org_id: UUID,
        checkout_id: UUID,
        *,
        actor: Actor,
        correlation_id: str,
        causation_id: str | None,
    ) -> CheckoutRefund:
        """Refund a completed checkout in whole and cancel its tickets; a repeat returns the
        same refund."""
        async with self._locked(org_id, checkout_id) as (session, c):
            if c.status is _S.COMPLETED:
                async with session.transaction() as conn:
                    await self.store.claim_for_refund(
                        conn, checkout_id, actor, correlation_id, causation_id
                    )
                c = replace(c, status=_S.REFUNDING, actor=actor,
                            correlation_id=correlation_id, causation_id=causation_id)  # fmt: skip
            else:
                await session.commit()
            if c.status not in (_S.REFUNDING, _S.REFUNDED):
                raise Conflict(
                    f"only a completed checkout can be refunded; this one is {c.status}",
                    reason="not_refundable", status=str(c.status),
                )  # fmt: skip
            if c.status is _S.REFUNDING:
                c = await self._drive_or_wait(session, c, None)
        if c.refund is None:
            raise Unavailable("refund is still in progress; retry", reason="in_progress")
        return CheckoutRefund.model_validate(c.refund)

    async def resume(self, org_id: UUID, checkout_id: UUID) -> CheckoutStatus | None:
        """Carry an interrupted saga on from its persisted state; None if another runner holds
        it (or it cannot go on yet)."""
        async with self.store.saga_session(org_id, checkout_id) as session:
            try:
                c = await session.open()
            except SagaBusy:
                return None
            await session.commit()
            if c is None or next_step(c.status) is SagaStep.NONE:
                return None if c is None else c.status
            SAGA_RESUMED.inc()
            log.info("saga_resuming", checkout_id=str(checkout_id), status=str(c.status))
            try:
                c = await self._drive(session, c, payment_token=None)
            except SagaWaiting as exc:
                log.warning("saga_waiting", checkout_id=str(checkout_id), error=str(exc))
                return None
            return c.status

    # -- the loop ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _locked(
        self, org_id: UUID, checkout_id: UUID, claim: CompletionClaim | None = None
    ) -> AsyncIterator[tuple[SagaSession, CheckoutRecord]]:
        """The checkout (``NotFound`` if the tenant has none) with its saga lock held for the
        block, waiting up to ``busy_wait_seconds`` for another runner (a concurrent retry, the
        resumer) to let go. With ``claim``, a pending checkout is claimed for completion in the
        same statement (``session.claimed``; already committed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.busy_wait_seconds
        while True:
            async with self.store.saga_session(org_id, checkout_id) as session:
                try:
                    c = await session.open(claim)
                except SagaBusy:
                    pass
                else:
                    if c is None:
                        raise NotFound(f"checkout {checkout_id} not found")
                    yield session, c
                    return
            if loop.time() > deadline:
                raise Unavailable("checkout is busy; retry", reason="in_progress")
            await asyncio.sleep(0.02)

    async def _drive_or_wait(
        self, session: SagaSession, c: CheckoutRecord, payment_token: str | None
    ) -> CheckoutRecord:
        try:
            return await self._drive(session, c, payment_token)
        except SagaWaiting as exc:
            raise Unavailable(
                f"payment outcome not known yet ({exc}); retry with the same Idempotency-Key",
                reason="in_progress",
            ) from exc

    async def _drive(
        self, session: SagaSession, c: CheckoutRecord, payment_token: str | None
    ) -> CheckoutRecord:
        """Run steps until the saga ends or has to wait."""
        while (step := next_step(c.status)) is not SagaStep.NONE:
            try:
                if step is SagaStep.CHARGE:
                    c = await self._charge(session, c, payment_token)
                elif step is SagaStep.POST:
                    c = await self._post(session, c, payment_token)
                elif step is SagaStep.ISSUE:
                    c = await self._issue(session, c)
                elif step is SagaStep.COMPENSATE:
                    c = await self._compensate(session, c)
                elif step is SagaStep.REFUND:
                    c = await self._refund(session, c)
            except LostRace:
                # not expected while we hold the lock; re-read and go on from the truth
                async with session.transaction(readonly=True) as conn:
                    reread = await self.store.load_checkout(conn, c.checkout_id)
                assert reread is not None
                c = reread
            except CONNECTION_ERRORS as exc:
                raise SagaWaiting(f"database unreachable: {exc!r}") from exc
        return c

    # -- steps ------------------------------------------------------------------------------

    async def _charge(
        self, session: SagaSession, c: CheckoutRecord, payment_token: str | None
    ) -> CheckoutRecord:
        org, key = c.organization_id, _processor_key(c.checkout_id)
        if c.total.is_zero:  # free tickets: nothing to charge
            return await self._after_charge(session, c, None, payment_token)
        try:
            if payment_token is None:
                # resuming without the buyer: find out whether the charge happened
                charge = await self.processor.find_charge(org, key)
                if charge is None:
                    async with session.transaction(readonly=True) as conn:
                        idle = await self.store.seconds_since_update(conn, c.checkout_id)
                    if idle < self.charge_grace_seconds:
                        raise SagaWaiting("no charge found yet; a request may be in flight")
                    return await self._fail(session, c, FailureReason.INTERRUPTED)
            else:
                charge = await self.processor.charge(org, key, c.total, payment_token)
        except PaymentDeclined as exc:
            log.info("payment_declined", checkout_id=str(c.checkout_id), reason=exc.reason)
            return await self._fail(session, c, FailureReason.DECLINED)
        except (ProcessorTimeout, ProcessorUnavailable) as exc:
            log.warning("processor_no_answer", checkout_id=str(c.checkout_id), error=repr(exc))
            try:
                charge = await self.processor.find_charge(org, key)
            except (ProcessorTimeout, ProcessorUnavailable) as again:
                raise SagaWaiting(f"processor unreachable: {again!r}") from again
            if charge is None:
                return await self._fail(session, c, FailureReason.PROCESSOR_TIMEOUT)
            # Money was taken but the answer was lost: give it back rather than sell on an
            # answer we never got (the buyer was told nothing yet).
            async with session.transaction() as conn:
                await self.store.move(conn, c, _S.COMPENSATING, charge_id=charge.charge_id,
                                      failure_reason=str(FailureReason.PROCESSOR_TIMEOUT))  # fmt: skip
            return replace(c, status=_S.COMPENSATING, charge_id=charge.charge_id,
                           failure_reason=FailureReason.PROCESSOR_TIMEOUT)  # fmt: skip
        return await self._after_charge(session, c, charge.charge_id, payment_token)

    async def _after_charge(
        self, session: SagaSession, c: CheckoutRecord, charge_id: str | None,
        payment_token: str | None,
    ) -> CheckoutRecord:
        """The processor has the money (or there was nothing to charge): finish in one
        transaction. A crash before it commits leaves ``charging``, which the resumer settles
        by finding the charge by its key. Only when a test asks to crash between the old
        steps does the saga persist ``charged`` and ``posted`` on their own (the same steps
        resume sagas that were left in those states)."""
        if self.faults.step_by_step:
            return await self._charged(session, c, charge_id)
        return await self._finish(session, c, charge_id, payment_token)

    async def _charged(self, session: SagaSession, c: CheckoutRecord, charge_id: str | None) -> CheckoutRecord:
        async with session.transaction() as conn:
            await self.store.move(conn, c, _S.CHARGED, charge_id=charge_id)
        self.faults.after("charge")
        return replace(c, status=_S.CHARGED, charge_id=charge_id)

    async def _post(
        self, session: SagaSession, c: CheckoutRecord, payment_token: str | None
    ) -> CheckoutRecord:
        try:
            self.faults.before_post(payment_token)
            entry = sale_entry(new_id(), c.checkout_id, c.total, c.total.share_bps(self.platform_fee_bps))
            posted_at = utcnow()
            async with session.transaction() as conn:
                if entry is not None:
                    await add_events(conn, SERVICE, self._envelopes(c, [_entry_event(entry, posted_at)]))
                await self.store.post_sale(conn, c, entry, posted_at)
        except (InjectedFailure, UnbalancedEntry, asyncpg.PostgresError) as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            return await self._start_compensation(session, c, exc)
        self.faults.after("post")
        return replace(c, status=_S.POSTED)

    async def _issue(self, session: SagaSession, c: CheckoutRecord) -> CheckoutRecord:
        tickets = [(new_ticket_code(), item) for item in c.items for _ in range(item.quantity)]
        issued = [IssuedTicket(ticket_code=code, ticket_type=item.ticket_type) for code, item in tickets]
        completion = CheckoutCompletion(
            checkout_id=c.checkout_id, status="completed", tickets=issued,
            total=c.total.amount, currency=c.total.currency,
        ).model_dump(mode="json")  # fmt: skip
        issued_at = utcnow()
        try:
            async with session.transaction() as conn:
                events: list = [
                    TicketIssued(ticket_code=code, event_id=c.event_id, ticket_type=item.ticket_type,
                                 checkout_id=c.checkout_id, issued_at=issued_at)  # fmt: skip
                    for code, item in tickets
                ]
                events.append(
                    CheckoutCompleted(
                        checkout_id=c.checkout_id, event_id=c.event_id, total=c.total.amount,
                        currency=c.total.currency, charge_id=c.charge_id, tickets=issued,
                        completed_at=issued_at,
                    )  # fmt: skip
                )
                await add_events(conn, SERVICE, self._envelopes(c, events))
                await self.store.issue_tickets(conn, c, tickets, issued_at, completion)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            return await self._start_compensation(session, c, exc)
        SAGA_OUTCOMES.labels("completed").inc()
        log.info("checkout_completed", checkout_id=str(c.checkout_id), tickets=len(tickets))
        return replace(c, status=_S.COMPLETED, completion=completion)

    async def _finish(
        self, session: SagaSession, c: CheckoutRecord, charge_id: str | None,
        payment_token: str | None,
    ) -> CheckoutRecord:
        """charging -> completed in one transaction (one statement): record the charge, post
        the sale, issue the tickets, consume the holds, queue every event; it also lets go of
        the saga lock. If it fails, nothing of it exists and the charge is recorded with
        ``compensating`` before anything else happens (then refunded)."""
        try:
            self.faults.before_post(payment_token)
            entry = sale_entry(new_id(), c.checkout_id, c.total, c.total.share_bps(self.platform_fee_bps))
        except (InjectedFailure, UnbalancedEntry) as exc:
            return await self._start_compensation(session, c, exc, charge_id=charge_id)
        now = utcnow()
        tickets = [(new_ticket_code(), item) for item in c.items for _ in range(item.quantity)]
        issued = [IssuedTicket(ticket_code=code, ticket_type=item.ticket_type) for code, item in tickets]
        completion = CheckoutCompletion(
            checkout_id=c.checkout_id, status="completed", tickets=issued,
            total=c.total.amount, currency=c.total.currency,
        ).model_dump(mode="json")  # fmt: skip
        events: list = [] if entry is None else [_entry_event(entry, now)]
        events += [
            TicketIssued(ticket_code=code, event_id=c.event_id, ticket_type=item.ticket_type,
                         checkout_id=c.checkout_id, issued_at=now)  # fmt: skip
            for code, item in tickets
        ]
        events.append(
            CheckoutCompleted(
                checkout_id=c.checkout_id, event_id=c.event_id, total=c.total.amount,
                currency=c.total.currency, charge_id=charge_id, tickets=issued, completed_at=now,
            )  # fmt: skip
        )
        try:
            await self.store.finish_checkout(
                session, c, charge_id, entry, now, tickets, now, completion, self._envelopes(c, events)
            )  # fmt: skip
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            return await self._start_compensation(session, c, exc, charge_id=charge_id)
        SAGA_OUTCOMES.labels("completed").inc()
        log.info("checkout_completed", checkout_id=str(c.checkout_id), tickets=len(tickets))
        return replace(c, status=_S.COMPLETED, charge_id=charge_id, completion=completion)

    async def _start_compensation(
        self, session: SagaSession, c: CheckoutRecord, exc: BaseException, *,
        charge_id: str | None = None,
    ) -> CheckoutRecord:
        """Move to ``compensating`` (with the charge, when it was taken in ``charging`` and is
        recorded only now) so the refund and the release follow."""
        log.warning("saga_step_failed", checkout_id=str(c.checkout_id), status=str(c.status),
                    error=repr(exc))  # fmt: skip
        fields: dict = {"failure_reason": str(FailureReason.PROCESSING_FAILED)}
        if charge_id is not None:
            fields["charge_id"] = charge_id
        async with session.transaction() as conn:
            await self.store.move(conn, c, _S.COMPENSATING, **fields)
        return replace(c, status=_S.COMPENSATING, charge_id=charge_id or c.charge_id,
                       failure_reason=FailureReason.PROCESSING_FAILED)  # fmt: skip

    async def _compensate(self, session: SagaSession, c: CheckoutRecord) -> CheckoutRecord:
        refund_id = None
        if c.charge_id is not None:
            try:
                refund = await self.processor.refund(c.organization_id, c.charge_id, c.total)
            except (ProcessorTimeout, ProcessorUnavailable) as exc:
                raise SagaWaiting(f"refund not confirmed: {exc!r}") from exc
            refund_id = refund.refund_id
        return await self._fail(
            session, c, c.failure_reason or FailureReason.PROCESSING_FAILED,
            refund_id=refund_id, charge_refunded=refund_id is not None,
        )  # fmt: skip

    async def _fail(
        self,
        session: SagaSession,
        c: CheckoutRecord,
        reason: FailureReason,
        *,
        refund_id: str | None = None,
        charge_refunded: bool = False,
    ) -> CheckoutRecord:
        """End the saga without tickets: reverse any booked sale, release the holds."""
        completion = CheckoutCompletion(
            checkout_id=c.checkout_id, status="failed", reason=reason.value,
            total=c.total.amount, currency=c.total.currency,
        ).model_dump(mode="json")  # fmt: skip
        failed_at = utcnow()
        async with session.transaction() as conn:
            events: list = []
            sale = await self.store.entry_for(conn, "checkout", c.checkout_id)
            if sale is not None:
                reversal = reversal_of(sale, new_id(), "compensation",
                                       f"sale of checkout {c.checkout_id} undone")  # fmt: skip
                await self.store.post(conn, c.organization_id, reversal, failed_at)
                events.append(_entry_event(reversal, failed_at))
            await self.store.release_holds(conn, c)
            await self.store.move(conn, c, _S.FAILED, failure_reason=str(reason),
                                  refund_id=refund_id, completion=completion)  # fmt: skip
            events.append(
                CheckoutFailed(checkout_id=c.checkout_id, event_id=c.event_id, reason=reason.value,
                               charge_refunded=charge_refunded, failed_at=failed_at)  # fmt: skip
            )
            await add_events(conn, SERVICE, self._envelopes(c, events))
        SAGA_OUTCOMES.labels(f"failed_{reason.value}").inc()
        log.info("checkout_failed", checkout_id=str(c.checkout_id), reason=reason.value,
                 charge_refunded=charge_refunded)  # fmt: skip
        return replace(c, status=_S.FAILED, failure_reason=reason, refund_id=refund_id,
                       completion=completion)  # fmt: skip

    async def _refund(self, session: SagaSession, c: CheckoutRecord) -> CheckoutRecord:
        refund_id = f"free:{c.checkout_id}"  # a free checkout has nothing to give back
        if c.charge_id is not None:
            try:
                refund = await self.processor.refund(c.organization_id, c.charge_id, c.total)
            except (ProcessorTimeout, ProcessorUnavailable) as exc:
                raise SagaWaiting(f"refund not confirmed: {exc!r}") from exc
            refund_id = refund.refund_id
        cancelled_at = utcnow()
        async with session.transaction() as conn:
            events: list = []
            sale = await self.store.entry_for(conn, "checkout", c.checkout_id)
            if sale is not None:
                reversal = reversal_of(sale, new_id(), "refund", f"refund of checkout {c.checkout_id}")
                await self.store.post(conn, c.organization_id, reversal, cancelled_at)
                events.append(_entry_event(reversal, cancelled_at))
            codes = await self.store.cancel_tickets(conn, c, cancelled_at)
            reply = CheckoutRefund(
                checkout_id=c.checkout_id, refund_id=refund_id, amount=c.total.amount,
                currency=c.total.currency, cancelled_tickets=codes,
            ).model_dump(mode="json")  # fmt: skip
            await self.store.move(conn, c, _S.REFUNDED, refund_id=refund_id, refund=reply)
            events += [
                TicketCancelled(ticket_code=code, event_id=c.event_id, reason="refunded",
                                cancelled_at=cancelled_at)  # fmt: skip
                for code in codes
            ]
            events.append(
                RefundCompleted(
                    checkout_id=c.checkout_id, event_id=c.event_id, refund_id=refund_id,
                    amount=c.total.amount, currency=c.total.currency, cancelled_tickets=codes,
                    refunded_at=cancelled_at,
                )  # fmt: skip
            )
            await add_events(conn, SERVICE, self._envelopes(c, events))
        SAGA_OUTCOMES.labels("refunded").inc()
        log.info("checkout_refunded", checkout_id=str(c.checkout_id), tickets=len(codes))
        return replace(c, status=_S.REFUNDED, refund_id=refund_id, refund=reply)

    @staticmethod
    def _envelopes(c: CheckoutRecord, events: list) -> list[Envelope]:
        # Resumed steps carry the actor and correlation of the request that started them.
        actor = c.actor or Actor.system("payments.saga", c.organization_id)
        correlation = c.correlation_id or str(c.checkout_id)
        return [
            e.envelope(c.organization_id, actor, correlation, c.causation_id) for e in events
        ]
