"""The ledger's rules held by PostgreSQL itself (raw SQL cannot post an unbalanced entry, edit
or delete a posted one), and a property test over random checkouts and refunds through the
running service: the trial balance stays zero and the receivable matches the processor."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.actor import Actor, ActorType, Role
from libs.db import create_pool, service_dsn, tenant_transaction
from libs.errors import Conflict
from libs.migrations import migrate
from services.payments.bootstrap import MIGRATIONS, build
from services.payments.domain.ledger import CHART_OF_ACCOUNTS


@pytest.fixture
async def service_pool(admin_dsn, platform_settings):
    """The payments schema, and a pool logged in as the service's own role (vge_payments)."""
    await migrate(admin_dsn, "payments", MIGRATIONS, role_password=platform_settings.db_role_password)
    pool = await create_pool(service_dsn(admin_dsn, "payments", platform_settings.db_role_password),
                             schema="payments")
    yield pool
    await pool.close()


@pytest.fixture
async def admin(admin_dsn):
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": "payments,vge"})
    yield conn
    await conn.close()


@pytest.fixture
async def org(service_pool) -> uuid.UUID:
    org = uuid.uuid4()
    async with tenant_transaction(service_pool, org) as conn:
        await conn.executemany(
            "INSERT INTO accounts (organization_id, code, name, kind) VALUES ($1, $2, $3, $4)",
            [(org, str(code), name, str(kind)) for code, (name, kind) in CHART_OF_ACCOUNTS.items()],
        )
    return org


async def insert_entry(conn, org, lines, entry_id=None) -> uuid.UUID:
    """Raw SQL: an entry and ``lines`` of (account, side, amount[, currency])."""
    entry_id = entry_id or uuid.uuid4()
    await conn.execute(
        "INSERT INTO journal_entries (organization_id, id, reference_type, reference_id, description) "
        "VALUES ($1, $2, 'checkout', $3, 'raw sql')", org, entry_id, uuid.uuid4())
    await add_lines(conn, org, entry_id, lines)
    return entry_id


async def add_lines(conn, org, entry_id, lines, first_no: int = 1) -> None:
    for n, (account, side, amount, *currency) in enumerate(lines, start=first_no):
        await conn.execute(
            "INSERT INTO journal_lines (organization_id, entry_id, line_no, account, side, amount, "
            "currency) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            org, entry_id, n, account, side, amount, (currency or ["ZAR"])[0])


R, V = "processor_receivable", "ticket_revenue"


@pytest.mark.parametrize("lines", [
    [(R, "debit", 10_000), (V, "credit", 9_000)],               # debit != credit
    [(R, "debit", 10_000)],                                     # one line
    [],                                                         # no lines at all
    [(R, "debit", 10_000, "ZAR"), (V, "credit", 10_000, "USD")],  # balanced only across currencies
], ids=["unbalanced", "single-line", "no-lines", "mixed-currency"])
async def test_database_rejects_an_unbalanced_entry_from_raw_sql(service_pool, admin, org, lines):
    with pytest.raises(asyncpg.CheckViolationError, match="at least two|does not balance"):
        async with tenant_transaction(service_pool, org) as conn:
            await insert_entry(conn, org, lines)
    # superusers too: the rule is in the database, not in a grant
    with pytest.raises(asyncpg.CheckViolationError):
        async with admin.transaction():
            await insert_entry(admin, org, lines)
    assert await admin.fetchval("SELECT count(*) FROM journal_entries WHERE organization_id = $1", org) == 0


async def test_a_posted_entry_is_closed_even_to_balanced_additions(service_pool, admin, org):
    async with tenant_transaction(service_pool, org) as conn:
        entry = await insert_entry(conn, org, [(R, "debit", 500), (V, "credit", 500)])
    with pytest.raises(asyncpg.CheckViolationError, match="already posted"):
        async with tenant_transaction(service_pool, org) as conn:
            await add_lines(conn, org, entry, [(R, "debit", 1), (V, "credit", 1)], first_no=3)
    # checking early does not open a gap: lines added after SET CONSTRAINTS IMMEDIATE are checked
    with pytest.raises(asyncpg.CheckViolationError, match="does not balance"):
        async with tenant_transaction(service_pool, org) as conn:
            fresh = await insert_entry(conn, org, [(R, "debit", 7), (V, "credit", 7)])
            await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            await add_lines(conn, org, fresh, [(R, "debit", 3)], first_no=3)
    assert await admin.fetchval("SELECT count(*) FROM journal_lines WHERE organization_id = $1", org) == 2


async def test_posted_entries_cannot_be_updated_or_deleted(service_pool, admin, org):
    async with tenant_transaction(service_pool, org) as conn:
        entry = await insert_entry(conn, org, [(R, "debit", 2_500), (V, "credit", 2_500)])
    edits = [
        "UPDATE journal_lines SET amount = amount + 1 WHERE entry_id = $1",
        "UPDATE journal_entries SET description = 'edited' WHERE id = $1",
        "DELETE FROM journal_lines WHERE entry_id = $1",
        "DELETE FROM journal_entries WHERE id = $1",
    ]
    for sql in edits:
        # the service's role has no such privilege ...
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenant_transaction(service_pool, org) as conn:
                await conn.execute(sql, entry)
        # ... and a trigger stops everyone else, superusers included
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="immutable"):
            async with admin.transaction():
                await admin.execute(sql, entry)
    for table in ("journal_lines", "journal_entries"):
        with pytest.raises(asyncpg.PostgresError, match="immutable|cannot truncate"):
            async with admin.transaction():
                await admin.execute(f"TRUNCATE {table} CASCADE")
    rows = await admin.fetch("SELECT amount FROM journal_lines WHERE entry_id = $1", entry)
    assert [r["amount"] for r in rows] == [2_500, 2_500]


# -- property: random checkouts and refunds keep the books straight ----------------------------

FEE_BPS = 250  # 2.5 % platform fee, so entries have three lines
PRICES = {"GA": 12_345, "VIP": 50_001}
TOKENS = ["tok_ok", "tok_ok", "tok_decline", "tok_timeout", "tok_fail_after_charge"]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("buy"), st.sampled_from(sorted(PRICES)), st.integers(1, 3),
                  st.sampled_from(TOKENS)),
        st.tuples(st.just("refund"), st.integers(0, 50)),
        st.tuples(st.just("abandon"), st.sampled_from(sorted(PRICES)), st.integers(1, 2)),
    ),
    min_size=1, max_size=12,
)


@pytest.fixture
async def fee_payments(start_service):
    return await start_service(partial(build, platform_fee_bps=FEE_BPS, hold_ttl_seconds=600))


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=operations)
async def test_random_checkouts_and_refunds_keep_the_trial_balance_at_zero(
        fee_payments, commands, admin, ops):
    org = uuid.uuid4()  # every example in a tenant of its own
    owner = Actor(user_id="owner", organization_id=org, role=Role.OWNER, type=ActorType.USER)

    async def call(name, body):
        return await commands.request(f"vge.cmd.payments.{name}", body, actor=owner, org_id=org,
                                      correlation_id=f"prop-{uuid.uuid4().hex[:6]}", timeout=10)

    start = datetime.now(UTC) + timedelta(days=1)
    event = await call("create_event", {
        "name": "prop", "starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=2)).isoformat(),
        "capacity": 100,
        "ticket_types": [{"code": c, "name": c, "price": p, "quantity": 8} for c, p in PRICES.items()]})
    kept: list[tuple[str, int]] = []  # (checkout id, total) of completed, not refunded
    fees = 0
    sold, held = Counter(), Counter()
    for op in ops:
        if op[0] in ("buy", "abandon"):
            code, quantity = op[1], op[2]
            try:
                checkout = await call("create_checkout", {
                    "event_id": event["event_id"], "customer_email": "p@example.com",
                    "items": [{"ticket_type": code, "quantity": quantity}]})
            except Conflict as exc:
                assert exc.extra["reason"] == "sold_out"
                assert sold[code] + held[code] + quantity > 8  # refused only when really sold out
                continue
            if op[0] == "abandon":
                held[code] += quantity
                continue
            done = await call("complete_checkout", {"checkout_id": checkout["checkout_id"],
                                                    "payment_token": op[3],
                                                    "idempotency_key": uuid.uuid4().hex})
            assert done["status"] == ("completed" if op[3] == "tok_ok" else "failed")
            if done["status"] == "completed":
                kept.append((checkout["checkout_id"], checkout["total"], code, quantity))
                sold[code] += quantity
                fees += (checkout["total"] * FEE_BPS + 5_000) // 10_000
        elif kept:
            checkout_id, total, code, quantity = kept.pop(op[1] % len(kept))
            refund = await call("refund_checkout", {"checkout_id": checkout_id})
            assert refund["amount"] == total
            sold[code] -= quantity
            fees -= (total * FEE_BPS + 5_000) // 10_000

    accounts = {a["account"]: a for a in (await call("ledger_balances", {}))["accounts"]}
    assert sum(a["balance"] for a in accounts.values()) == 0  # the trial balance
    assert all(a["debit"] - a["credit"] == a["balance"] for a in accounts.values())
    receivable = accounts.get("processor_receivable", {"balance": 0})["balance"]
    expected = sum(total for _, total, _, _ in kept)
    assert receivable == expected
    assert -accounts.get("platform_fees", {"balance": 0})["balance"] == fees
    net = await admin.fetchval(
        "SELECT coalesce(sum(c.amount), 0) - coalesce(sum(r.amount), 0) "
        "FROM fake_processor_charges c LEFT JOIN fake_processor_refunds r "
        "ON r.organization_id = c.organization_id AND r.charge_id = c.id "
        "WHERE c.organization_id = $1", org)
    assert net == receivable  # the processor's money and the ledger agree
    stock = {r["code"]: (r["reserved"], r["held"], r["sold"]) for r in await admin.fetch(
        "SELECT t.code, t.reserved, "
        " (SELECT coalesce(sum(quantity), 0) FROM holds h WHERE h.ticket_type_id = t.id "
        "   AND h.state = 'active') AS held, "
        " (SELECT count(*) FROM tickets k WHERE k.ticket_type_id = t.id AND k.status = 'issued') AS sold "
        "FROM ticket_types t WHERE t.organization_id = $1", org)}
    assert stock == {code: (held[code] + sold[code], held[code], sold[code]) for code in PRICES}
    issued = await admin.fetchval("SELECT count(*) FROM tickets WHERE organization_id = $1 "
                                  "AND status = 'issued'", org)
    assert issued == sum(sold.values())


async def test_every_payments_table_has_forced_row_level_security(service_pool, admin):
    rows = await admin.fetch(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'payments' AND c.relkind = 'r' "
        # the shared kernel's own tables (migrations bookkeeping, outbox and its relay's
        # position, consumer tracking)
        "AND c.relname NOT IN ('schema_migrations', 'outbox', 'outbox_relay', 'processed_events')")
    tables = {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in rows}
    assert {"events", "ticket_types", "checkouts", "holds", "tickets", "accounts",
            "journal_entries", "journal_lines", "fake_processor_charges",
            "fake_processor_refunds"} <= set(tables)
    assert {t for t, flags in tables.items() if flags != (True, True)} == set()
    # and the service's role cannot see a row without a tenant
    async with service_pool.acquire() as conn:
        for table in tables:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
