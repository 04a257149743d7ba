"""Payments' one-statement steps and their batches (migrations 0002/0003): concurrent checkouts
of a tenant are created and finished together, and each still succeeds or fails on its own;
the saga lock is never left behind on a pooled connection (the store's pool does not reset
connections); row-level security holds inside the functions."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial

import asyncpg
import pytest

from libs.actor import Actor, ActorType, Role
from libs.db import service_dsn
from libs.errors import Conflict
from services.payments.bootstrap import build

PRICE = 12_500


@pytest.fixture
async def db(admin_dsn):
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": "payments,vge"})
    yield conn
    await conn.close()


class Pay:
    def __init__(self, commands, org: uuid.UUID) -> None:
        self.commands, self.org = commands, org
        self.owner = Actor(user_id="owner", organization_id=org, role=Role.OWNER, type=ActorType.USER)

    async def __call__(self, name, body, timeout=30.0):
        return await self.commands.request(f"vge.cmd.payments.{name}", body, actor=self.owner,
                                           org_id=self.org, correlation_id=uuid.uuid4().hex,
                                           timeout=timeout)

    async def event(self, quantity: int, price: int = PRICE):
        start = datetime.now(UTC) + timedelta(days=5)
        return await self("create_event", {
            "name": "batch", "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=2)).isoformat(), "capacity": 10_000,
            "ticket_types": [{"code": "GA", "name": "GA", "price": price, "quantity": quantity},
                             {"code": "VIP", "name": "VIP", "price": price * 2, "quantity": 3}]})

    async def checkout(self, event_id, items, **extra):
        return await self("create_checkout", {
            "event_id": event_id, "customer_email": "b@example.com",
            "items": [{"ticket_type": t, "quantity": q} for t, q in items], **extra})

    async def complete(self, checkout_id, token="tok_ok"):
        return await self("complete_checkout", {"checkout_id": checkout_id, "payment_token": token,
                                                "idempotency_key": uuid.uuid4().hex})


async def held_saga_locks(db, checkout_ids) -> int:
    """How many of these checkouts' saga locks some session still holds."""
    keys = [f"vge.payments.checkout:{c}" for c in checkout_ids]
    return await db.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN unnest($1::text[]) k "
        "ON l.locktype = 'advisory' AND l.granted "
        "AND ((l.classid::bigint << 32) | l.objid::bigint) = (hashtextextended(k, 0) & x'ffffffffffffffff'::bigint)",
        keys)


async def test_concurrent_checkouts_are_created_and_finished_together_each_on_its_own(
        start_service, commands, db):
    await start_service(partial(build, hold_ttl_seconds=60, sweep_interval_seconds=0.2))
    org = uuid.uuid4()
    pay = Pay(commands, org)
    event = await pay.event(quantity=40)

    async def buy(n: int):
        # a mix: one GA, two GA + one VIP (only 3 VIPs exist: most of those are sold out)
        items = [("GA", 1)] if n % 2 else [("GA", 2), ("VIP", 1)]
        try:
            checkout = await pay.checkout(event["event_id"], items)
        except Conflict as exc:
            assert exc.extra["reason"] == "sold_out"
            return "sold_out", exc.extra["ticket_type"]
        done = await pay.complete(checkout["checkout_id"], token="tok_decline" if n % 7 == 0 else "tok_ok")
        return done["status"], checkout["checkout_id"]

    results = await asyncio.gather(*(buy(n) for n in range(40)))
    outcomes = Counter(status for status, _ in results)
    vip_sold = await db.fetchval(
        "SELECT count(*) FROM tickets WHERE organization_id = $1 AND ticket_type = 'VIP'", org)
    ga_sold = await db.fetchval(
        "SELECT count(*) FROM tickets WHERE organization_id = $1 AND ticket_type = 'GA'", org)
    completed = [cid for status, cid in results if status == "completed"]
    # every completed checkout has its tickets, its one balanced entry, its events
    assert outcomes["completed"] == len(completed) > 0
    assert outcomes["failed"] > 0  # the declined ones: no money, no tickets, holds released
    assert all(tt == "VIP" for status, tt in results if status == "sold_out")
    assert vip_sold <= 3
    assert await db.fetchval("SELECT count(*) FROM journal_entries WHERE organization_id = $1",
                             org) == len(completed)
    assert await db.fetchval(
        "SELECT count(DISTINCT checkout_id) FROM tickets WHERE organization_id = $1", org) == len(completed)
    receivable = await db.fetchval(
        "SELECT coalesce(sum(CASE side WHEN 'debit' THEN amount ELSE -amount END), 0) "
        "FROM journal_lines WHERE organization_id = $1 AND account = 'processor_receivable'", org)
    assert receivable == ga_sold * PRICE + vip_sold * 2 * PRICE
    assert await db.fetchval(
        "SELECT coalesce(sum(CASE side WHEN 'debit' THEN amount ELSE -amount END), 0) "
        "FROM journal_lines WHERE organization_id = $1", org) == 0
    charged = await db.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM fake_processor_charges WHERE organization_id = $1", org)
    assert charged == receivable
    # stock: reserved = held + sold, nothing held once every saga ended
    for code in ("GA", "VIP"):
        row = await db.fetchrow(
            "SELECT t.reserved, (SELECT coalesce(sum(quantity), 0) FROM holds h WHERE "
            "h.ticket_type_id = t.id AND h.state = 'active') AS held FROM ticket_types t "
            "WHERE t.event_id = $1 AND t.code = $2", uuid.UUID(event["event_id"]), code)
        sold = vip_sold if code == "VIP" else ga_sold
        assert (row["reserved"], row["held"]) == (sold, 0)
    # checkout.created, ledger.entry_posted, ticket.issued and checkout.completed in the outbox
    subjects = Counter(
        s.rsplit(".", 2)[-2] + "." + s.rsplit(".", 1)[-1]
        for s in await db.fetchval("SELECT array_agg(subject) FROM outbox WHERE organization_id = $1", org))
    assert subjects["checkout.completed"] == len(completed)
    assert subjects["ledger.entry_posted"] == len(completed)
    assert subjects["ticket.issued"] == ga_sold + vip_sold
    # no saga lock is left on a pooled connection
    assert await held_saga_locks(db, [cid for _, cid in results]) == 0


async def test_one_idempotency_key_created_concurrently_is_one_checkout(start_service, commands, db):
    """Concurrent creations with the same key land in one batch or race across batches: the
    batch fails on the key, its checkouts are retried one by one, and all get the first one."""
    await start_service(partial(build, hold_ttl_seconds=60))
    org = uuid.uuid4()
    pay = Pay(commands, org)
    event = await pay.event(quantity=10)
    views = await asyncio.gather(*(
        pay.checkout(event["event_id"], [("GA", 2)], idempotency_key="same-key") for _ in range(12)))
    others = await asyncio.gather(*(pay.checkout(event["event_id"], [("GA", 1)]) for _ in range(3)))
    assert len({v["checkout_id"] for v in views}) == 1
    assert len({v["checkout_id"] for v in others}) == 3
    assert await db.fetchval("SELECT reserved FROM ticket_types WHERE event_id = $1 AND code = 'GA'",
                             uuid.UUID(event["event_id"])) == 2 + 3
    assert await db.fetchval("SELECT count(*) FROM checkouts WHERE organization_id = $1", org) == 4


async def test_the_step_functions_see_and_touch_only_their_tenant(
        start_service, commands, db, platform_settings):
    """The functions set the tenant themselves: called as the service role for another
    tenant, they find nothing and change nothing."""
    await start_service(partial(build, hold_ttl_seconds=60))
    org = uuid.uuid4()
    pay = Pay(commands, org)
    event = await pay.event(quantity=5)
    checkout = await pay.checkout(event["event_id"], [("GA", 1)])
    conn = await asyncpg.connect(
        service_dsn(platform_settings.database_url, "payments", platform_settings.db_role_password),
        server_settings={"search_path": "payments,vge"})
    try:
        intruder = uuid.uuid4()
        cid = uuid.UUID(checkout["checkout_id"])
        assert await conn.fetchrow("SELECT * FROM checkout_open($1, $2, 'k', 'key', '{}'::jsonb, 'c', NULL)",
                                   intruder, cid) is None
        assert await conn.fetchval(
            "SELECT checkout_finish($1, $2, 'pending', NULL, '{}'::jsonb, $3, now(), '{}', '{}', '{}', "
            "NULL, NULL, now(), '{}', '{}', '{}', '{}', '{}', '{}', '{}', NULL)",
            intruder, cid, uuid.UUID(event["event_id"])) is False
        # the same calls as the owner tenant do see it (and the unclaimed open changes nothing)
        row = await conn.fetchrow("SELECT * FROM checkout_open($1, $2, 'k')", org, cid)
        assert row["status"] == "pending" and row["locked"] and not row["claimed"]
        await conn.execute("SELECT pg_advisory_unlock_all()")
        # outside a function the service role still sees no tenant at all
        assert await conn.fetchval("SELECT count(*) FROM checkouts") == 0
    finally:
        await conn.close()
    assert await db.fetchval("SELECT status FROM checkouts WHERE id = $1", cid) == "pending"
