"""Payments against real NATS and PostgreSQL: catalog, holds under concurrency across two
replicas, the checkout saga's outcomes per payment token, idempotent completion, refunds,
events through the outbox, tenancy and policy."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import pytest

from libs.actor import Actor, ActorType, Role
from libs.contracts.catalog import EventCreated, TicketCancelled, TicketIssued
from libs.contracts.payments import (
    CheckoutCompleted,
    CheckoutExpired,
    CheckoutFailed,
    LedgerEntryPosted,
    RefundCompleted,
)
from libs.envelope import Envelope
from libs.db import service_dsn
from libs.errors import Conflict, Forbidden, InvalidInput, NotFound, Unavailable
from libs.subjects import EVENTS_STREAM
from services.payments.adapters.processor import (
    FakeProcessor,
    ProcessorTimeout,
    ProcessorUnavailable,
)
from services.payments.bootstrap import build

PRICE = 15_000  # R150.00


# -- helpers ---------------------------------------------------------------------------------


def user(org: uuid.UUID, role: Role = Role.OWNER) -> Actor:
    return Actor(user_id=f"u-{uuid.uuid4().hex[:8]}", organization_id=org, role=role, type=ActorType.USER)


class Payments:
    """Sends payments commands for one tenant, as the gateway would."""

    def __init__(self, commands, org: uuid.UUID) -> None:
        self.commands = commands
        self.org = org
        self.owner = user(org)

    async def __call__(self, name: str, body: dict[str, Any], actor: Actor | None = None,
                       timeout: float = 10.0) -> dict[str, Any]:
        return await self.commands.request(
            f"vge.cmd.payments.{name}", body, actor=actor or self.owner, org_id=self.org,
            correlation_id=f"corr-{uuid.uuid4().hex[:8]}", timeout=timeout,
        )

    async def event(self, quantity: int = 10, price: int = PRICE, **extra: Any) -> dict[str, Any]:
        start = datetime.now(UTC) + timedelta(days=7)
        body = {
            "name": "Test Match", "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=3)).isoformat(), "capacity": 1_000,
            "reentry_allowed": True, "zones": ["north", "south"],
            "ticket_types": [
                {"code": "GA", "name": "General", "price": price, "quantity": quantity},
                {"code": "VIP", "name": "VIP", "price": price * 3, "quantity": 5, "zones": ["north"]},
            ],
            **extra,
        }
        return await self("create_event", body)

    async def checkout(self, event_id: str, quantity: int = 1, ticket_type: str = "GA",
                       timeout: float = 10.0, **extra: Any) -> dict[str, Any]:
        return await self("create_checkout", {
            "event_id": event_id, "items": [{"ticket_type": ticket_type, "quantity": quantity}],
            "customer_email": "buyer@example.com", **extra,
        }, timeout=timeout)

    async def complete(self, checkout_id: str, token: str = "tok_ok", key: str | None = None,
                       **kw: Any) -> dict[str, Any]:
        return await self("complete_checkout", {
            "checkout_id": checkout_id, "payment_token": token,
            "idempotency_key": key or f"idem-{uuid.uuid4().hex}",
        }, **kw)

    async def balances(self) -> dict[str, dict[str, int]]:
        reply = await self("ledger_balances", {})
        return {a["account"]: a for a in reply["accounts"]}


async def published(nc, org: uuid.UUID, until, timeout: float = 10.0) -> list[Envelope]:
    """Events of ``org`` from JetStream, read until ``until(events)`` holds."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(f"vge.evt.{org}.payments.>", stream=EVENTS_STREAM)
    got: list[Envelope] = []
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not until(got):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"events not published in time: {Counter(e.type for e in got)}")
            try:
                msgs = await sub.fetch(200, timeout=0.3)
            except TimeoutError:  # nats-py raises its own subclass or the plain one
                continue
            for m in msgs:
                got.append(Envelope.from_bytes(m.data))
                await m.ack()
    finally:
        await sub.unsubscribe()
    return got


def count_types(**want: int):
    return lambda events: all(Counter(e.type for e in events)[t.replace("__", ".")] >= n
                              for t, n in want.items())


async def eventually(check, timeout: float = 10.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met in time (last: {value!r})")
        await asyncio.sleep(interval)


@pytest.fixture
async def db(admin_dsn):
    """An admin connection (superuser: sees every tenant) for checking stored state."""
    conn = await asyncpg.connect(admin_dsn)
    yield conn
    await conn.close()


async def stock(db, event_id: str, code: str = "GA") -> tuple[int, int]:
    """(held, sold) of a ticket type, from its holds and tickets; checks that the type's
    reserved counter (what overselling is prevented with) agrees."""
    row = await db.fetchrow(
        "SELECT t.reserved, "
        " (SELECT coalesce(sum(quantity), 0) FROM payments.holds h "
        "   WHERE h.ticket_type_id = t.id AND h.state = 'active') AS held, "
        " (SELECT count(*) FROM payments.tickets k "
        "   WHERE k.ticket_type_id = t.id AND k.status = 'issued') AS sold "
        "FROM payments.ticket_types t WHERE t.event_id = $1 AND t.code = $2",
        uuid.UUID(event_id), code,
    )
    assert row["reserved"] == row["held"] + row["sold"]
    return row["held"], row["sold"]


async def processor_books(db, org: uuid.UUID) -> tuple[int, int, int]:
    """(number of charges, charged total, refunded total) at the fake processor."""
    row = await db.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(c.amount), 0) AS charged, "
        "coalesce(sum(r.amount), 0) AS refunded FROM payments.fake_processor_charges c "
        "LEFT JOIN payments.fake_processor_refunds r "
        "ON r.organization_id = c.organization_id AND r.charge_id = c.id "
        "WHERE c.organization_id = $1", org,
    )
    return row["n"], int(row["charged"]), int(row["refunded"])


async def ledger_lines(db, org: uuid.UUID) -> int:
    return await db.fetchval("SELECT count(*) FROM payments.journal_lines WHERE organization_id = $1", org)


@pytest.fixture
async def payments(start_service):
    """One payments replica with short holds and a fast sweep."""
    return await start_service(partial(build, hold_ttl_seconds=60, sweep_interval_seconds=0.2))


@pytest.fixture
def org() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture
def pay(commands, org) -> Payments:
    return Payments(commands, org)


# -- catalog ---------------------------------------------------------------------------------


async def test_create_event_publishes_event_created_in_the_catalog_shape(payments, pay, nc, org):
    event = await pay.event(quantity=10, idempotency_key="ev-1")
    assert [(t["code"], t["available"]) for t in event["ticket_types"]] == [("GA", 10), ("VIP", 5)]
    # a retry with the same key is the same event, not a second one
    assert (await pay.event(quantity=10, idempotency_key="ev-1"))["event_id"] == event["event_id"]

    [env] = [e for e in await published(nc, org, count_types(event__created=1)) if e.type == "event.created"]
    created = EventCreated.from_envelope(env)  # the shape scanning consumes
    assert str(created.event_id) == event["event_id"]
    assert created.reentry_allowed is True and created.zones == ["north", "south"]
    assert [(t.code, t.price, t.currency, t.quantity, t.zones) for t in created.ticket_types] == [
        ("GA", PRICE, "ZAR", 10, []), ("VIP", PRICE * 3, "ZAR", 5, ["north"])]
    assert env.org_id == org and env.actor == pay.owner


async def test_event_rules_and_policy(payments, pay, org):
    with pytest.raises(InvalidInput, match="capacity"):
        await pay.event(quantity=10, capacity=12)  # 10 GA + 5 VIP > 12
    with pytest.raises(InvalidInput, match="zones"):
        await pay.event(zones=["east"])  # VIP names "north"
    for role in (Role.STAFF, Role.VIEWER):
        with pytest.raises(Forbidden):
            await pay("create_event", {"name": "x", "starts_at": "2030-01-01T10:00:00Z",
                                       "ends_at": "2030-01-01T12:00:00Z", "capacity": 1,
                                       "ticket_types": [{"code": "A", "name": "A", "price": 1,
                                                         "quantity": 1}]},
                      actor=user(org, role))


# -- checkout saga ---------------------------------------------------------------------------


async def test_checkout_completes_with_tickets_a_balanced_entry_and_events(payments, pay, nc, org, db):
    event = await pay.event(quantity=10)
    checkout = await pay.checkout(event["event_id"], quantity=2)
    assert (checkout["status"], checkout["total"], checkout["currency"]) == ("pending", 2 * PRICE, "ZAR")
    assert datetime.fromisoformat(checkout["expires_at"]) > datetime.now(UTC) + timedelta(seconds=50)
    assert await stock(db, event["event_id"]) == (2, 0)

    done = await pay.complete(checkout["checkout_id"])
    assert done["status"] == "completed" and done.get("reason") is None
    codes = [t["ticket_code"] for t in done["tickets"]]
    assert [t["ticket_type"] for t in done["tickets"]] == ["GA", "GA"]
    assert len(set(codes)) == 2 and all(len(c) >= 22 for c in codes)  # 128 random bits
    assert await stock(db, event["event_id"]) == (0, 2)

    balances = await pay.balances()
    assert balances["processor_receivable"]["balance"] == 2 * PRICE
    assert balances["ticket_revenue"]["balance"] == -2 * PRICE
    assert sum(a["balance"] for a in balances.values()) == 0
    assert await processor_books(db, org) == (1, 2 * PRICE, 0)

    events = await published(nc, org, count_types(checkout__completed=1, ticket__issued=2,
                                                   ledger__entry_posted=1, checkout__created=1))
    issued = [TicketIssued.from_envelope(e) for e in events if e.type == "ticket.issued"]
    assert sorted(t.ticket_code for t in issued) == sorted(codes)
    assert {str(t.event_id) for t in issued} == {event["event_id"]}
    completed = CheckoutCompleted.from_envelope(next(e for e in events if e.type == "checkout.completed"))
    assert completed.total == 2 * PRICE and len(completed.tickets) == 2
    entry = LedgerEntryPosted.from_envelope(next(e for e in events if e.type == "ledger.entry_posted"))
    assert {(l.account, l.side, l.amount) for l in entry.lines} == {
        ("processor_receivable", "debit", 2 * PRICE), ("ticket_revenue", "credit", 2 * PRICE)}
    view = await pay("get_checkout", {"checkout_id": checkout["checkout_id"]})
    assert view["status"] == "completed" and sorted(t["ticket_code"] for t in view["tickets"]) == sorted(codes)


async def test_each_step_wakes_the_relay_itself_without_notifying(start_service, commands, nc, org,
                                                                  outbox_notifications):
    # payments' commits do not NOTIFY (libs/sql/0002): each step wakes the service's relay
    # itself, the SQL-function steps included. With an hour's poll interval, only those
    # wake-ups publish in time; each step's events are awaited before the next step runs.
    await start_service(partial(build, hold_ttl_seconds=60, sweep_interval_seconds=0.2),
                        outbox_poll_seconds=3600.0)
    pay = Payments(commands, org)
    notified = await outbox_notifications("payments")
    event = await pay.event(quantity=10)  # add_events in a tenant transaction
    await published(nc, org, count_types(event__created=1))
    checkout = await pay.checkout(event["event_id"])  # checkout_create
    await published(nc, org, count_types(checkout__created=1))
    await pay.complete(checkout["checkout_id"])  # the saga's steps, then checkout_finish
    await published(nc, org, count_types(checkout__completed=1, ticket__issued=1))
    assert notified == []


async def test_completing_again_with_the_same_key_returns_the_first_result_and_charges_once(
        payments, pay, org, db):
    event = await pay.event()
    checkout = await pay.checkout(event["event_id"], quantity=3)
    key = "client-key-1"
    # the client retries at once (e.g. a double click): both get the same answer
    first, second = await asyncio.gather(pay.complete(checkout["checkout_id"], key=key),
                                         pay.complete(checkout["checkout_id"], key=key))
    third = await pay.complete(checkout["checkout_id"], key=key)
    assert first == second == third and first["status"] == "completed" and len(first["tickets"]) == 3
    assert await processor_books(db, org) == (1, 3 * PRICE, 0)
    assert await db.fetchval("SELECT count(*) FROM payments.tickets WHERE organization_id = $1", org) == 3
    with pytest.raises(Conflict) as other_key:
        await pay.complete(checkout["checkout_id"], key="another-key")
    assert other_key.value.extra["reason"] == "already_completing"
    # the key belongs to that checkout: using it on another one is a conflict, not a replay
    other = await pay.checkout(event["event_id"])
    with pytest.raises(Conflict) as reused:
        await pay.complete(other["checkout_id"], key=key)
    assert reused.value.extra["reason"] == "idempotency_key_reused"
    assert await processor_books(db, org) == (1, 3 * PRICE, 0)


async def test_declined_card_books_nothing_issues_nothing_and_releases_the_holds(
        payments, pay, nc, org, db):
    event = await pay.event()
    checkout = await pay.checkout(event["event_id"], quantity=4)
    assert await stock(db, event["event_id"]) == (4, 0)
    done = await pay.complete(checkout["checkout_id"], token="tok_decline")
    assert (done["status"], done["reason"], done["tickets"]) == ("failed", "declined", [])
    assert await ledger_lines(db, org) == 0
    assert await processor_books(db, org) == (0, 0, 0)
    assert await db.fetchval("SELECT count(*) FROM payments.tickets WHERE organization_id = $1", org) == 0
    assert await stock(db, event["event_id"]) == (0, 0)
    events = await published(nc, org, count_types(checkout__failed=1))
    failed = CheckoutFailed.from_envelope(next(e for e in events if e.type == "checkout.failed"))
    assert (failed.reason, failed.charge_refunded) == ("declined", False)
    assert not any(e.type in ("ticket.issued", "ledger.entry_posted") for e in events)
    # a failed checkout is over: completing it again with another key is refused
    with pytest.raises(Conflict):
        await pay.complete(checkout["checkout_id"], token="tok_ok")


@pytest.mark.parametrize(("token", "reason"), [("tok_timeout", "processor_timeout"),
                                               ("tok_fail_after_charge", "processing_failed")])
async def test_money_taken_then_failure_is_refunded_and_no_ticket_exists(
        payments, pay, nc, org, db, token, reason):
    """tok_timeout: the processor took the money but its answer was lost; the saga finds the
    charge by idempotency key and refunds it. tok_fail_after_charge: the step after the charge
    fails; the saga compensates. Either way: a defined end, never tickets without money."""
    event = await pay.event()
    checkout = await pay.checkout(event["event_id"], quantity=2)
    done = await pay.complete(checkout["checkout_id"], token=token)
    assert (done["status"], done["reason"], done["tickets"]) == ("failed", reason, [])
    assert await processor_books(db, org) == (1, 2 * PRICE, 2 * PRICE)  # charged and refunded
    assert await ledger_lines(db, org) == 0
    assert await db.fetchval("SELECT count(*) FROM payments.tickets WHERE organization_id = $1", org) == 0
    assert await stock(db, event["event_id"]) == (0, 0)
    status = await db.fetchval("SELECT status FROM payments.checkouts WHERE id = $1",
                               uuid.UUID(checkout["checkout_id"]))
    assert status == "failed"
    events = await published(nc, org, count_types(checkout__failed=1))
    failed = CheckoutFailed.from_envelope(next(e for e in events if e.type == "checkout.failed"))
    assert (failed.reason, failed.charge_refunded) == (reason, True)


class UnreachableLookups:
    """The fake processor whose answers are lost: every charge times out after taking the
    money, and the first ``failures`` look-ups cannot reach it either."""

    def __init__(self, fake, failures: int) -> None:
        self.fake, self.failures = fake, failures

    async def charge(self, merchant, idempotency_key, amount, token):
        await self.fake.charge(merchant, idempotency_key, amount, token)
        raise ProcessorTimeout("answer lost")

    async def find_charge(self, merchant, idempotency_key):
        if self.failures > 0:
            self.failures -= 1
            raise ProcessorUnavailable("still unreachable")
        return await self.fake.find_charge(merchant, idempotency_key)

    async def refund(self, merchant, charge_id, amount):
        return await self.fake.refund(merchant, charge_id, amount)


async def test_processor_unreachable_the_saga_waits_then_the_resumer_settles_it(
        start_service, platform_settings, pay, org, db):
    """A timeout whose outcome cannot even be looked up: no guess, the client is told to retry
    (unavailable), the saga stays in 'charging', and the periodic resumer settles it once the
    processor answers: the charge is found, so the sale completes, exactly once."""
    fake = FakeProcessor()
    try:
        await start_service(partial(build, processor=UnreachableLookups(fake, failures=3),
                                    sweep_interval_seconds=0.1, resume_idle_seconds=0.2))
        # (the service's start created the schema and login role the fake connects with)
        await fake.open(service_dsn(platform_settings.database_url, "payments",
                                    platform_settings.db_role_password))
        event = await pay.event()
        checkout = await pay.checkout(event["event_id"], quantity=2)
        with pytest.raises(Unavailable) as pending:
            await pay.complete(checkout["checkout_id"], key="k-unreachable")
        assert pending.value.extra["reason"] == "in_progress"
        checkout_id = uuid.UUID(checkout["checkout_id"])

        async def settled():
            return await db.fetchval("SELECT status FROM payments.checkouts WHERE id = $1",
                                     checkout_id) == "completed"

        await eventually(settled, timeout=10)
        again = await pay.complete(checkout["checkout_id"], key="k-unreachable")
        assert again["status"] == "completed" and len(again["tickets"]) == 2
        assert await processor_books(db, org) == (1, 2 * PRICE, 0)
        assert (await pay.balances())["processor_receivable"]["balance"] == 2 * PRICE
    finally:
        await fake.close()


async def test_free_tickets_complete_without_a_charge_or_an_entry(payments, pay, org, db):
    event = await pay.event(price=0)
    checkout = await pay.checkout(event["event_id"], quantity=2)
    assert checkout["total"] == 0
    done = await pay.complete(checkout["checkout_id"])
    assert done["status"] == "completed" and len(done["tickets"]) == 2
    assert await processor_books(db, org) == (0, 0, 0) and await ledger_lines(db, org) == 0


# -- inventory under concurrency -------------------------------------------------------------


async def test_hundred_concurrent_checkouts_on_two_replicas_sell_exactly_the_ten_left(
        start_service, commands, org, db):
    # holds last 4 s: long enough for a buyer under this load, short enough to outwait below
    replicas = [await start_service(partial(build, hold_ttl_seconds=4.0, sweep_interval_seconds=0.2))
                for _ in range(2)]
    pay = Payments(commands, org)
    event = await pay.event(quantity=10)

    async def buy(n: int) -> str:
        try:
            checkout = await pay.checkout(event["event_id"], quantity=1, timeout=30)
        except Conflict as exc:
            assert exc.extra["reason"] == "sold_out" and exc.extra["ticket_type"] == "GA"
            return "sold_out"
        done = await pay.complete(checkout["checkout_id"], timeout=30)
        return done["status"]

    outcomes = Counter(await asyncio.gather(*(buy(n) for n in range(100))))
    assert outcomes == {"completed": 10, "sold_out": 90}
    assert await stock(db, event["event_id"]) == (0, 10)
    codes = await db.fetch("SELECT code FROM payments.tickets WHERE organization_id = $1", org)
    assert len({r["code"] for r in codes}) == 10
    assert await processor_books(db, org) == (10, 10 * PRICE, 0)
    assert (await pay.balances())["processor_receivable"]["balance"] == 10 * PRICE
    # both replicas took part (the queue group shares the commands)
    assert all(sum(sub.delivered for sub in r.router._subs) > 10 for r in replicas)
    # nothing is left held once every hold's lifetime (and a sweep) has passed
    async def all_lapsed():
        return await db.fetchval("SELECT max(expires_at) < now() - interval '0.5 s' "
                                 "FROM payments.checkouts WHERE organization_id = $1", org)

    await eventually(all_lapsed, timeout=15)
    assert await stock(db, event["event_id"]) == (0, 10)
    assert await db.fetchval("SELECT count(*) FROM payments.holds WHERE organization_id = $1 "
                             "AND state = 'active'", org) == 0
    statuses = await db.fetch("SELECT status, count(*) FROM payments.checkouts "
                              "WHERE organization_id = $1 GROUP BY status", org)
    assert {r["status"]: r["count"] for r in statuses} == {"completed": 10}


async def test_abandoned_holds_expire_once_across_replicas_and_go_back_on_sale(
        start_service, commands, nc, org, db):
    for _ in range(2):
        await start_service(partial(build, hold_ttl_seconds=1.0, sweep_interval_seconds=0.1))
    pay = Payments(commands, org)
    event = await pay.event(quantity=5)
    abandoned = [await pay.checkout(event["event_id"]) for _ in range(5)]
    with pytest.raises(Conflict) as sold_out:
        await pay.checkout(event["event_id"])
    assert sold_out.value.extra == {"reason": "sold_out", "ticket_type": "GA", "available": 0}

    async def released():
        return await stock(db, event["event_id"]) == (0, 0)

    await eventually(released, timeout=10)
    events = await published(nc, org, count_types(checkout__expired=5))
    expired = [CheckoutExpired.from_envelope(e) for e in events if e.type == "checkout.expired"]
    assert sorted(str(e.checkout_id) for e in expired) == sorted(c["checkout_id"] for c in abandoned)
    with pytest.raises(Conflict) as too_late:
        await pay.complete(abandoned[0]["checkout_id"])
    assert too_late.value.extra["reason"] == "expired"
    assert await processor_books(db, org) == (0, 0, 0)
    # the stock is for sale again
    again = await pay.checkout(event["event_id"], quantity=5)
    assert (await pay.complete(again["checkout_id"]))["status"] == "completed"


async def test_create_checkout_is_idempotent_and_validates_items(payments, pay, db):
    event = await pay.event(quantity=10)
    first = await pay.checkout(event["event_id"], quantity=2, idempotency_key="cart-1")
    second = await pay.checkout(event["event_id"], quantity=2, idempotency_key="cart-1")
    assert first["checkout_id"] == second["checkout_id"]
    assert await stock(db, event["event_id"]) == (2, 0)
    with pytest.raises(InvalidInput):
        await pay.checkout(event["event_id"], ticket_type="BALCONY")
    with pytest.raises(NotFound):
        await pay.checkout(str(uuid.uuid4()))
    # the same type twice in one checkout is one hold of the sum
    both = await pay("create_checkout", {
        "event_id": event["event_id"], "customer_email": "b@example.com",
        "items": [{"ticket_type": "GA", "quantity": 1}, {"ticket_type": "VIP", "quantity": 1},
                  {"ticket_type": "GA", "quantity": 2}]})
    assert both["total"] == 3 * PRICE + 3 * PRICE
    assert await stock(db, event["event_id"]) == (5, 0)


# -- refunds ---------------------------------------------------------------------------------


async def test_refund_cancels_tickets_reverses_the_entry_and_publishes_ticket_cancelled(
        payments, pay, nc, org, db):
    event = await pay.event(quantity=10)
    checkout = await pay.checkout(event["event_id"], quantity=2)
    with pytest.raises(Conflict) as not_yet:
        await pay("refund_checkout", {"checkout_id": checkout["checkout_id"]})
    assert not_yet.value.extra["reason"] == "not_refundable"
    done = await pay.complete(checkout["checkout_id"], key="pay-once")
    codes = sorted(t["ticket_code"] for t in done["tickets"])
    with pytest.raises(Forbidden):  # staff sell, only owners/admins refund
        await pay("refund_checkout", {"checkout_id": checkout["checkout_id"]}, actor=user(org, Role.STAFF))

    refund = await pay("refund_checkout", {"checkout_id": checkout["checkout_id"]})
    assert (refund["status"], refund["amount"], refund["currency"]) == ("refunded", 2 * PRICE, "ZAR")
    assert refund["cancelled_tickets"] == codes
    assert await pay("refund_checkout", {"checkout_id": checkout["checkout_id"]}) == refund  # idempotent
    assert await processor_books(db, org) == (1, 2 * PRICE, 2 * PRICE)
    balances = await pay.balances()
    assert balances["processor_receivable"] == {"account": "processor_receivable", "debit": 2 * PRICE,
                                                "credit": 2 * PRICE, "balance": 0, "currency": "ZAR"}
    assert balances["ticket_revenue"]["balance"] == 0
    assert await stock(db, event["event_id"]) == (0, 0)  # back on sale
    statuses = await db.fetch("SELECT status FROM payments.tickets WHERE organization_id = $1", org)
    assert {r["status"] for r in statuses} == {"cancelled"}

    events = await published(nc, org, count_types(ticket__cancelled=2, refund__completed=1,
                                                   ledger__entry_posted=2))
    cancelled = [TicketCancelled.from_envelope(e) for e in events if e.type == "ticket.cancelled"]
    assert sorted(c.ticket_code for c in cancelled) == codes  # the shape scanning consumes
    assert {(str(c.event_id), c.reason) for c in cancelled} == {(event["event_id"], "refunded")}
    entries = [LedgerEntryPosted.from_envelope(e) for e in events if e.type == "ledger.entry_posted"]
    sale = next(e for e in entries if e.reference_type == "checkout")
    reversal = next(e for e in entries if e.reference_type == "refund")
    assert reversal.reverses_entry_id == sale.entry_id
    assert RefundCompleted.from_envelope(next(e for e in events if e.type == "refund.completed")).amount == 2 * PRICE
    # a retried completion still answers with its first result, and charges nothing
    assert await pay.complete(checkout["checkout_id"], key="pay-once") == done
    assert await processor_books(db, org) == (1, 2 * PRICE, 2 * PRICE)


# -- tenancy and policy ----------------------------------------------------------------------


async def test_other_tenants_see_nothing_and_roles_are_enforced(payments, pay, commands, org):
    event = await pay.event()
    checkout = await pay.checkout(event["event_id"])
    await pay.complete(checkout["checkout_id"])

    stranger = Payments(commands, uuid.uuid4())
    with pytest.raises(NotFound):
        await stranger("get_checkout", {"checkout_id": checkout["checkout_id"]})
    with pytest.raises(NotFound):
        await stranger.complete(checkout["checkout_id"])
    with pytest.raises(NotFound):
        await stranger("refund_checkout", {"checkout_id": checkout["checkout_id"]})
    with pytest.raises(NotFound):  # another tenant's event is not found, never forbidden
        await stranger.checkout(event["event_id"])
    assert (await stranger("ledger_balances", {}))["accounts"] == []

    viewer, staff, admin = (user(org, r) for r in (Role.VIEWER, Role.STAFF, Role.ADMIN))
    with pytest.raises(Forbidden):
        await pay("create_checkout", {"event_id": event["event_id"], "customer_email": "a@b.c",
                                      "items": [{"ticket_type": "GA", "quantity": 1}]}, actor=viewer)
    for who in (viewer, staff):
        with pytest.raises(Forbidden):
            await pay("ledger_balances", {}, actor=who)
    assert (await pay("ledger_balances", {}, actor=admin))["accounts"]
    staff_checkout = await pay("create_checkout", {
        "event_id": event["event_id"], "customer_email": "a@b.c",
        "items": [{"ticket_type": "GA", "quantity": 1}]}, actor=staff)
    assert (await pay.complete(staff_checkout["checkout_id"], actor=staff))["status"] == "completed"
    platform_staff = Actor(user_id="ps", organization_id=None, role=None, is_platform_staff=True,
                           type=ActorType.USER)
    assert (await pay("ledger_balances", {}, actor=platform_staff))["accounts"]
