"""Payments' command handlers: check the policy, translate the message, call the domain, the
store or the saga, and shape the reply. Nothing else lives here."""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import replace
from uuid import UUID

import asyncpg

from libs.commands import CommandRouter
from libs.context import CommandContext
from libs.contracts.catalog import EventCreated, TicketTypeInfo
from libs.contracts.payments import (
    AccountBalance,
    CheckoutCompletion,
    CheckoutCreated,
    CheckoutItem,
    CheckoutRefund,
    CheckoutView,
    CompleteCheckout,
    CreateCheckout,
    CreateEvent,
    EventView,
    GetCheckout,
    GetLedgerBalances,
    IssuedTicket,
    LedgerBalances,
    RefundCheckout,
    TicketTypeView,
)
from libs.envelope import new_id, utcnow
from libs.errors import Conflict, InvalidInput, NotFound, Unavailable
from libs.outbox import add_events
from libs.policy import Action, Resource, authorize
from services.payments.adapters.postgres import (
    CatalogChanged,
    CheckoutRecord,
    EventRow,
    PaymentsStore,
    SoldOut,
    TicketTypeRow,
    UnknownTicketType,
)
from services.payments.domain.catalog import CatalogRuleBroken, TicketTypeRule, check_event
from services.payments.domain.checkout import PricedItem, hold_expires_at, price_items
from services.payments.domain.money import CurrencyMismatch, Money
from services.payments.saga import SERVICE, CheckoutSaga

__all__ = ["register_commands"]


def _tenant(ctx: CommandContext) -> UUID:
    # Payments data always belongs to a tenant; a platform actor names the one it acts in.
    if ctx.org_id is None:
        raise InvalidInput("payments commands act inside a tenant (org_id)")
    return ctx.org_id


def _event_view(event: EventRow) -> EventView:
    return EventView(
        event_id=event.event_id,
        name=event.name,
        starts_at=event.starts_at,
        ends_at=event.ends_at,
        capacity=event.capacity,
        reentry_allowed=event.reentry_allowed,
        zones=list(event.zones),
        ticket_types=[
            TicketTypeView(
                code=t.code, name=t.name, price=t.price.amount, currency=t.price.currency,
                quantity=t.quantity, zones=list(t.zones), available=t.available,
            )  # fmt: skip
            for t in event.ticket_types
        ],
    )


def _checkout_view(c: CheckoutRecord, tickets: list[tuple[str, str, str]] | None = None) -> CheckoutView:
    return CheckoutView(
        checkout_id=c.checkout_id,
        event_id=c.event_id,
        total=c.total.amount,
        currency=c.total.currency,
        expires_at=c.expires_at,
        status=c.status.value,
        items=[CheckoutItem(ticket_type=i.ticket_type, quantity=i.quantity) for i in c.items],
        reason=c.failure_reason.value if c.failure_reason else None,
        tickets=[IssuedTicket(ticket_code=code, ticket_type=t) for code, t, _ in tickets or []],
    )


def register_commands(
    router: CommandRouter, store: PaymentsStore, saga: CheckoutSaga, *, hold_ttl_seconds: float
) -> None:
    """Register every payments command on ``router``."""

    @router.command("create_event", CreateEvent, EventView)
    async def create_event(ctx: CommandContext, req: CreateEvent) -> EventView:
        """Create an event with its ticket types; publishes ``event.created``."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.EVENT_CREATE, Resource("event", org))
        try:
            check_event(
                req.starts_at, req.ends_at, req.capacity, req.zones,
                [TicketTypeRule(t.code, t.quantity, tuple(t.zones)) for t in req.ticket_types],
                req.valid_from, req.valid_until,
            )  # fmt: skip
        except CatalogRuleBroken as exc:
            raise InvalidInput(str(exc)) from exc
        event = EventRow(
            event_id=new_id(), name=req.name, starts_at=req.starts_at, ends_at=req.ends_at,
            valid_from=req.valid_from, valid_until=req.valid_until, capacity=req.capacity,
            reentry_allowed=req.reentry_allowed, zones=tuple(req.zones),
            ticket_types=tuple(
                TicketTypeRow(new_id(), t.code, t.name, Money(t.price, t.currency), t.quantity,
                              0, tuple(t.zones))  # fmt: skip
                for t in req.ticket_types
            ),
        )  # fmt: skip
        created = EventCreated(
            event_id=event.event_id, name=req.name, starts_at=req.starts_at, ends_at=req.ends_at,
            capacity=req.capacity, reentry_allowed=req.reentry_allowed, valid_from=req.valid_from,
            valid_until=req.valid_until, zones=req.zones,
            ticket_types=[TicketTypeInfo(**t.model_dump()) for t in req.ticket_types],
        )  # fmt: skip
        try:
            async with store.transaction(org) as conn:
                if req.idempotency_key:
                    existing = await store.event_id_by_key(conn, req.idempotency_key)
                    if existing is not None:
                        return _event_view(await store.load_event(conn, existing))  # type: ignore[arg-type]
                await store.ensure_chart(conn, org)
                await store.insert_event(conn, org, event, req.idempotency_key)
                await add_events(
                    conn, SERVICE,
                    [created.envelope(org, ctx.actor, ctx.correlation_id, ctx.message_id)],
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            if not req.idempotency_key:
                raise
            async with store.transaction(org, readonly=True) as conn:  # lost a race on the key
                existing = await store.event_id_by_key(conn, req.idempotency_key)
                return _event_view(await store.load_event(conn, existing))  # type: ignore[arg-type]
        return _event_view(event)

    @router.command("create_checkout", CreateCheckout, CheckoutView)
    async def create_checkout(ctx: CommandContext, req: CreateCheckout) -> CheckoutView:
        """Hold tickets for a buyer until completion or expiry; sold out is ``conflict``."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.CHECKOUT_CREATE, Resource("checkout", org))
        wanted = Tally[str]()
        for item in req.items:  # the same type twice is one line
            wanted[item.ticket_type] += item.quantity
        for attempt in (1, 2):
            known = await store.ticket_types_of(org, req.event_id)
            if known is None or any(code not in known for code in wanted):
                # not ours or not a type of it: find out which, the way it always was
                async with store.transaction(org, readonly=True) as conn:
                    if req.idempotency_key:  # a repeat returns the first checkout, as ever
                        existing = await store.checkout_id_by_create_key(conn, req.idempotency_key)
                        if existing is not None:
                            return _checkout_view(await store.load_checkout(conn, existing))  # type: ignore[arg-type]
                    try:
                        await store.ticket_types_for(conn, req.event_id, sorted(wanted))
                    except UnknownTicketType as exc:
                        if await store.load_event(conn, req.event_id) is None:
                            raise NotFound(f"event {req.event_id} not found") from exc
                        raise InvalidInput(str(exc), ticket_type=exc.ticket_type) from exc
                store.forget_ticket_types(org, req.event_id)  # it exists after all: reload
                continue
            items = [replace(known[code], quantity=wanted[code]) for code in sorted(wanted)]
            try:
                total = price_items([PricedItem(i.ticket_type, i.quantity, i.unit_price) for i in items])
            except CurrencyMismatch as exc:
                if req.idempotency_key:  # a repeat returns the first checkout, as ever
                    async with store.transaction(org, readonly=True) as conn:
                        existing = await store.checkout_id_by_create_key(conn, req.idempotency_key)
                        if existing is not None:
                            return _checkout_view(await store.load_checkout(conn, existing))  # type: ignore[arg-type]
                raise InvalidInput(str(exc)) from exc
            checkout_id = new_id()
            expires_at = hold_expires_at(utcnow(), hold_ttl_seconds)
            lines = [CheckoutItem(ticket_type=i.ticket_type, quantity=i.quantity) for i in items]
            created = CheckoutCreated(
                checkout_id=checkout_id, event_id=req.event_id, items=lines,
                total=total.amount, currency=total.currency, expires_at=expires_at,
            ).envelope(org, ctx.actor, ctx.correlation_id, ctx.message_id)  # fmt: skip
            try:
                # checkout, holds, event and stock: one statement, one transaction
                existing = await store.create_checkout(
                    org, checkout_id, req.event_id, req.customer_email, total, expires_at,
                    items, req.idempotency_key, [created],
                )  # fmt: skip
            except SoldOut as exc:
                raise Conflict(
                    f"sold out: {exc}", reason="sold_out", ticket_type=exc.ticket_type,
                    available=exc.available,
                ) from exc  # fmt: skip
            except CatalogChanged:
                store.forget_ticket_types(org, req.event_id)
                if attempt == 2:
                    raise
                continue
            except asyncpg.UniqueViolationError:
                if not req.idempotency_key:
                    raise
                # lost a race on the key: the winner's checkout
                async with store.transaction(org, readonly=True) as conn:
                    existing = await store.checkout_id_by_create_key(conn, req.idempotency_key)
            if existing is not None:  # created before with this Idempotency-Key
                async with store.transaction(org, readonly=True) as conn:
                    return _checkout_view(await store.load_checkout(conn, existing))  # type: ignore[arg-type]
            return CheckoutView(
                checkout_id=checkout_id, event_id=req.event_id, total=total.amount,
                currency=total.currency, expires_at=expires_at, status="pending", items=lines,
            )  # fmt: skip
        raise Unavailable("the event's ticket types could not be read; retry")

    @router.command("complete_checkout", CompleteCheckout, CheckoutCompletion)
    async def complete_checkout(ctx: CommandContext, req: CompleteCheckout) -> CheckoutCompletion:
        """Pay and issue tickets; the same Idempotency-Key returns the first result."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.CHECKOUT_COMPLETE, Resource("checkout", org, str(req.checkout_id)))
        return await saga.complete(
            org, req.checkout_id, payment_token=req.payment_token,
            idempotency_key=req.idempotency_key, actor=ctx.actor,
            correlation_id=ctx.correlation_id, causation_id=ctx.message_id,
        )  # fmt: skip

    @router.command("refund_checkout", RefundCheckout, CheckoutRefund)
    async def refund_checkout(ctx: CommandContext, req: RefundCheckout) -> CheckoutRefund:
        """Refund a completed checkout in whole; its tickets are cancelled."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.CHECKOUT_REFUND, Resource("checkout", org, str(req.checkout_id)))
        return await saga.refund(
            org, req.checkout_id, actor=ctx.actor, correlation_id=ctx.correlation_id,
            causation_id=ctx.message_id,
        )  # fmt: skip

    @router.command("get_checkout", GetCheckout, CheckoutView)
    async def get_checkout(ctx: CommandContext, req: GetCheckout) -> CheckoutView:
        """One checkout with its status, holds and tickets."""
        org = _tenant(ctx)
        # Reading a sale is for those who may sell (there is no separate read action yet).
        authorize(ctx.actor, Action.CHECKOUT_READ, Resource("checkout", org, str(req.checkout_id)))
        async with store.transaction(org, readonly=True) as conn:
            c = await store.load_checkout(conn, req.checkout_id)
            if c is None:
                raise NotFound(f"checkout {req.checkout_id} not found")
            tickets = await store.tickets_of(conn, req.checkout_id)
        return _checkout_view(c, tickets)

    @router.command("ledger_balances", GetLedgerBalances, LedgerBalances)
    async def ledger_balances(ctx: CommandContext, req: GetLedgerBalances) -> LedgerBalances:
        """Debit, credit and balance (debit minus credit) of every used account."""
        org = _tenant(ctx)
        authorize(ctx.actor, Action.LEDGER_READ, Resource("ledger", org))
        async with store.transaction(org, readonly=True) as conn:
            rows = await store.balances(conn)
        return LedgerBalances(
            accounts=[
                AccountBalance(account=a, currency=cur, debit=d, credit=c, balance=d - c)
                for a, cur, d, c in rows
            ]
        )
