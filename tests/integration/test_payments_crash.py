"""A payments process killed with SIGKILL in the middle of a checkout saga, then restarted:
the saga completes (or refunds), and the processor's charges minus refunds equal the ledger's
processor receivable.

The crash is made deterministic with the test-only ``VGE_PAYMENTS_CRASH_AFTER=<step>``: the
process SIGKILLs itself right after that saga step has committed (see
``services/payments/adapters/faults.py``).
"""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from libs.actor import Actor, ActorType, Role
from libs.errors import Unavailable

PRICE = 20_000
SWEEP = {"VGE_HOLD_SWEEP_INTERVAL_SECONDS": "0.2"}  # lapsed holds released, idle sagas resumed


@pytest.fixture
async def db(admin_dsn):
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": "payments,vge"})
    yield conn
    await conn.close()


@pytest.mark.parametrize(("crash_after", "status_at_crash"), [("charge", "charged"), ("post", "posted")])
async def test_killed_mid_saga_then_restarted_completes_and_the_money_reconciles(
        service_process, commands, db, crash_after, status_at_crash):
    org = uuid.uuid4()
    call = _owner_commands(commands, org)

    first = service_process("payments", VGE_PAYMENTS_CRASH_AFTER=crash_after, **SWEEP)
    await first.healthy()
    event, checkout, complete = await _sale_to_complete(call, "crash-key")
    with pytest.raises(Unavailable):  # the process dies before it can answer
        await call("complete_checkout", complete, timeout=3)
    assert await first.exited() == -signal.SIGKILL

    checkout_id = uuid.UUID(checkout["checkout_id"])
    assert await db.fetchval("SELECT status FROM checkouts WHERE id = $1", checkout_id) == status_at_crash
    assert await db.fetchval("SELECT count(*) FROM tickets WHERE checkout_id = $1", checkout_id) == 0
    assert await db.fetchval("SELECT count(*) FROM fake_processor_charges "
                             "WHERE organization_id = $1", org) == 1

    await _restart_completes_once(service_process, call, db, org, event, checkout, complete)


async def test_killed_after_the_charge_before_anything_was_recorded_the_restart_completes_once(
        service_process, server_urls, commands, db, platform_settings):
    """The saga's own path: after the charge, recording it, booking the sale, issuing the
    tickets and queueing the events are ONE transaction. A kill between the processor's answer
    and that commit leaves the checkout in 'charging' with the money at the processor. Made
    here by killing the process right after 'charging' committed and then letting the charge
    land at the processor (the request was on the wire): the restart finds the charge by its
    key and completes the sale, exactly once."""
    from services.payments.adapters.processor import FakeProcessor
    from services.payments.domain.money import Money
    from services.payments.saga import _processor_key
    from libs.db import service_dsn

    org = uuid.uuid4()
    call = _owner_commands(commands, org)

    first = service_process("payments", VGE_PAYMENTS_CRASH_AFTER="charging", **SWEEP)
    fake = FakeProcessor()
    try:
        await first.healthy()
        event, checkout, complete = await _sale_to_complete(call, "crash-key-taken")
        with pytest.raises(Unavailable):
            await call("complete_checkout", complete, timeout=3)
        assert await first.exited() == -signal.SIGKILL
        checkout_id = uuid.UUID(checkout["checkout_id"])
        assert await db.fetchval("SELECT status FROM checkouts WHERE id = $1", checkout_id) == "charging"

        # the charge that was in flight when the process died reaches the processor
        await fake.open(service_dsn(server_urls["database_url"], "payments",
                                    platform_settings.db_role_password))
        await fake.charge(org, _processor_key(checkout_id), Money(2 * PRICE, "ZAR"), "tok_ok")
        assert await db.fetchval("SELECT count(*) FROM tickets WHERE checkout_id = $1", checkout_id) == 0
        assert await db.fetchval("SELECT count(*) FROM journal_entries WHERE organization_id = $1", org) == 0

        await _restart_completes_once(service_process, call, db, org, event, checkout, complete)
        assert await db.fetchval("SELECT charge_id FROM checkouts WHERE id = $1", checkout_id) is not None
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1 "
                                 "AND subject LIKE '%ticket.issued'", org) == 2
    finally:
        await fake.close()


async def _restart_completes_once(service_process, call, db, org, event, checkout, complete) -> None:
    """Restarted without the crash switch, payments resumes the saga before it serves commands:
    the checkout is completed, the client's retry gets the same tickets, and the sale is charged
    and booked once, its two tickets reserved and its hold consumed."""
    await service_process("payments", **SWEEP).healthy()
    view = await call("get_checkout", {"checkout_id": checkout["checkout_id"]})
    assert view["status"] == "completed" and len(view["tickets"]) == 2
    retried = await call("complete_checkout", complete)
    assert retried["status"] == "completed"
    assert sorted(t["ticket_code"] for t in retried["tickets"]) == sorted(
        t["ticket_code"] for t in view["tickets"])
    await _charged_once_and_booked_once(db, call, org)
    assert await db.fetchval("SELECT reserved FROM ticket_types WHERE event_id = $1",
                             uuid.UUID(event["event_id"])) == 2
    assert await db.fetchval("SELECT count(*) FROM holds WHERE checkout_id = $1 "
                             "AND state = 'consumed'", uuid.UUID(checkout["checkout_id"])) == 1


async def _charged_once_and_booked_once(db, call, org) -> None:
    """One charge, in the ledger once: charges minus refunds equal the receivable, the trial
    balance is zero and there is exactly one journal entry."""
    charged, refunded, charges = await db.fetchrow(
        "SELECT coalesce(sum(c.amount), 0), coalesce(sum(r.amount), 0), count(c.id) "
        "FROM fake_processor_charges c LEFT JOIN fake_processor_refunds r "
        "ON r.organization_id = c.organization_id AND r.charge_id = c.id "
        "WHERE c.organization_id = $1", org)
    balances = {a["account"]: a for a in (await call("ledger_balances", {}))["accounts"]}
    assert charges == 1
    assert charged - refunded == balances["processor_receivable"]["balance"] == 2 * PRICE
    assert sum(a["balance"] for a in balances.values()) == 0
    assert await db.fetchval("SELECT count(*) FROM journal_entries WHERE organization_id = $1", org) == 1


def _owner_commands(commands, org):
    """``call(name, body)``: a payments command as the tenant's owner."""
    owner = Actor(user_id="owner", organization_id=org, role=Role.OWNER, type=ActorType.USER)

    async def call(name, body, timeout=10.0):
        return await commands.request(f"vge.cmd.payments.{name}", body, actor=owner, org_id=org,
                                      correlation_id=f"crash-{uuid.uuid4().hex[:6]}", timeout=timeout)

    return call


async def _sale_to_complete(call, key):
    """An event with 10 tickets and a pending checkout of 2; the completion command to send."""
    start = datetime.now(UTC) + timedelta(days=3)
    event = await call("create_event", {
        "name": "crash", "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=2)).isoformat(), "capacity": 10,
        "ticket_types": [{"code": "GA", "name": "GA", "price": PRICE, "quantity": 10}]})
    checkout = await call("create_checkout", {
        "event_id": event["event_id"], "customer_email": "c@example.com",
        "items": [{"ticket_type": "GA", "quantity": 2}]})
    complete = {"checkout_id": checkout["checkout_id"], "payment_token": "tok_ok",
                "idempotency_key": key}
    return event, checkout, complete
