"""Payments' pure domain: money, journal entries, the saga's state machine, hold expiry,
catalog rules, ticket codes and the fault switches."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.payments.adapters.faults import InjectedFailure, SagaFaults
from services.payments.domain.catalog import CatalogRuleBroken, TicketTypeRule, check_event
from services.payments.domain.checkout import (
    TERMINAL,
    TRANSITIONS,
    UNFINISHED,
    CheckoutStatus as S,
    IllegalTransition,
    PricedItem,
    SagaStep,
    ensure_transition,
    hold_expires_at,
    is_expired,
    next_step,
    price_items,
)
from services.payments.domain.ledger import (
    Account,
    JournalEntry,
    JournalLine,
    Side,
    UnbalancedEntry,
    account_balances,
    reversal_of,
    sale_entry,
    trial_balance,
)
from services.payments.domain.money import CurrencyMismatch, Money
from services.payments.domain.tickets import new_ticket_code

# -- money -----------------------------------------------------------------------------------


def test_money_is_integer_minor_units_in_one_currency():
    assert Money(150_00) + Money(50) == Money(150_50, "ZAR")
    assert Money(300).times(3) == Money(900)
    with pytest.raises(CurrencyMismatch):
        Money(1, "ZAR") + Money(1, "USD")
    for bad in (1.5, True, "10"):
        with pytest.raises(TypeError):
            Money(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Money(1, "rand")


def test_fee_share_rounds_half_up_to_a_whole_cent():
    assert Money(10_000).share_bps(250) == Money(250)
    assert Money(20).share_bps(250) == Money(1)  # 0.5 cent rounds up
    assert Money(19).share_bps(250) == Money(0)  # 0.475 cent rounds down
    with pytest.raises(ValueError):
        Money(1).share_bps(-1)


# -- ledger ----------------------------------------------------------------------------------


def _line(account: str, side: Side, amount: int, currency: str = "ZAR") -> JournalLine:
    return JournalLine(account, side, Money(amount, currency))


@pytest.mark.parametrize("lines", [
    [_line("a", Side.DEBIT, 100), _line("b", Side.CREDIT, 99)],
    [_line("a", Side.DEBIT, 100)],
    [_line("a", Side.DEBIT, 100, "ZAR"), _line("b", Side.CREDIT, 100, "USD")],
], ids=["unbalanced", "one-line", "across-currencies"])
def test_an_unbalanced_entry_cannot_be_built(lines):
    with pytest.raises(UnbalancedEntry):
        JournalEntry(uuid.uuid4(), "checkout", uuid.uuid4(), "x", tuple(lines))


def test_lines_are_positive():
    for amount in (0, -5):
        with pytest.raises(UnbalancedEntry):
            _line("a", Side.DEBIT, amount)


def test_sale_entry_books_receivable_revenue_and_fee():
    checkout = uuid.uuid4()
    entry = sale_entry(uuid.uuid4(), checkout, Money(10_000), Money(250))
    assert entry is not None and entry.reference_id == checkout
    assert {(l.account, l.side, l.amount.amount) for l in entry.lines} == {
        (Account.PROCESSOR_RECEIVABLE, Side.DEBIT, 10_000),
        (Account.TICKET_REVENUE, Side.CREDIT, 9_750),
        (Account.PLATFORM_FEES, Side.CREDIT, 250),
    }
    no_fee = sale_entry(uuid.uuid4(), checkout, Money(10_000), Money(0))
    assert no_fee is not None and len(no_fee.lines) == 2
    assert sale_entry(uuid.uuid4(), checkout, Money(0), Money(0)) is None  # free: nothing to book
    with pytest.raises(UnbalancedEntry):
        sale_entry(uuid.uuid4(), checkout, Money(100), Money(101))


def test_reversal_swaps_every_line_and_points_at_the_original():
    sale = sale_entry(uuid.uuid4(), uuid.uuid4(), Money(5_000), Money(100))
    assert sale is not None
    rev = reversal_of(sale, uuid.uuid4(), "refund", "refund")
    assert rev.reverses_entry_id == sale.entry_id and rev.reference_id == sale.reference_id
    assert [(l.account, l.side.opposite, l.amount) for l in rev.lines] == [
        (l.account, l.side, l.amount) for l in sale.lines]
    totals = account_balances([*sale.lines, *rev.lines])
    assert all(debit == credit for debit, credit in totals.values())


@given(st.lists(st.tuples(st.integers(1, 10_000_000), st.integers(0, 1_000), st.booleans(),
                          st.sampled_from(["ZAR", "USD"])), max_size=40))
def test_any_mix_of_sales_and_refunds_keeps_the_trial_balance_at_zero(sales):
    lines: list[JournalLine] = []
    receivable: dict[str, int] = {}
    for total, fee_bps, refunded, currency in sales:
        amount = Money(total, currency)
        entry = sale_entry(uuid.uuid4(), uuid.uuid4(), amount, amount.share_bps(fee_bps))
        assert entry is not None
        lines += entry.lines
        receivable[currency] = receivable.get(currency, 0) + total
        if refunded:
            lines += reversal_of(entry, uuid.uuid4(), "refund", "r").lines
            receivable[currency] -= total
    assert all(v == 0 for v in trial_balance(lines).values())
    balances = account_balances(lines)
    for currency, expected in receivable.items():
        debit, credit = balances.get((Account.PROCESSOR_RECEIVABLE, currency), (0, 0))
        assert debit - credit == expected


# -- the saga's state machine ----------------------------------------------------------------


def test_happy_path_and_refund_are_allowed_transitions():
    path = [S.PENDING, S.CHARGING, S.CHARGED, S.POSTED, S.COMPLETED, S.REFUNDING, S.REFUNDED]
    for a, b in zip(path, path[1:]):
        ensure_transition(a, b)


@pytest.mark.parametrize(("a", "b"), [
    (S.PENDING, S.COMPLETED),     # tickets without a charge
    (S.PENDING, S.CHARGED),
    (S.CHARGED, S.COMPLETED),     # tickets without a booked sale
    (S.CHARGED, S.FAILED),        # money kept without a refund
    (S.POSTED, S.FAILED),
    (S.FAILED, S.CHARGING),
    (S.EXPIRED, S.CHARGING),
    (S.REFUNDED, S.COMPLETED),
    (S.COMPLETED, S.FAILED),
])
def test_transitions_that_would_lose_money_or_tickets_are_refused(a, b):
    with pytest.raises(IllegalTransition):
        ensure_transition(a, b)


def test_once_charged_every_way_out_refunds_or_completes():
    """From any state where money may have been taken, every path ends in completed (tickets)
    or passes through compensating (refund) before failed."""
    money_taken = {S.CHARGED, S.POSTED}

    def ends(state, seen_compensation=False, depth=0):
        assert depth < 20
        if state in TERMINAL:
            yield state, seen_compensation
        for nxt in TRANSITIONS[state]:
            yield from ends(nxt, seen_compensation or nxt is S.COMPENSATING, depth + 1)

    for start in money_taken:
        for end, compensated in ends(start):
            assert end is S.REFUNDED or (end is S.FAILED and compensated)


def test_every_unfinished_state_has_a_step_and_nothing_else_does():
    assert {s for s in S if next_step(s) is not SagaStep.NONE} == UNFINISHED
    assert next_step(S.CHARGING) is SagaStep.CHARGE and next_step(S.COMPENSATING) is SagaStep.COMPENSATE
    assert TERMINAL == {S.FAILED, S.EXPIRED, S.REFUNDED}


def test_only_a_pending_checkout_expires():
    now = datetime(2030, 1, 1, tzinfo=UTC)
    expires = hold_expires_at(now, 900)
    assert expires == now + timedelta(minutes=15)
    assert not is_expired(S.PENDING, expires, now)
    assert is_expired(S.PENDING, expires, expires)
    assert not is_expired(S.CHARGING, expires, expires + timedelta(hours=1))  # the saga owns it
    with pytest.raises(ValueError):
        hold_expires_at(now, 0)


def test_a_checkout_is_priced_in_one_currency():
    items = [PricedItem("GA", 2, Money(150_00)), PricedItem("VIP", 1, Money(450_00))]
    assert price_items(items) == Money(750_00)
    with pytest.raises(CurrencyMismatch):
        price_items([PricedItem("GA", 1, Money(1, "ZAR")), PricedItem("X", 1, Money(1, "USD"))])
    with pytest.raises(ValueError):
        price_items([])


# -- catalog, tickets, faults ----------------------------------------------------------------

START = datetime(2030, 6, 1, 18, tzinfo=UTC)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ends_at": START}, "ends after"),
    ({"capacity": 5}, "capacity"),
    ({"zones": ["a", "a"]}, "once"),
    ({"ticket_types": [TicketTypeRule("GA", 1), TicketTypeRule("GA", 1)]}, "unique"),
    ({"ticket_types": [TicketTypeRule("GA", 1, ("east",))]}, "zones"),
])
def test_catalog_rules(kwargs, message):
    args = {"starts_at": START, "ends_at": START + timedelta(hours=3), "capacity": 100,
            "zones": ["north"], "ticket_types": [TicketTypeRule("GA", 10, ("north",))], **kwargs}
    if kwargs.get("capacity") == 5:
        args["ticket_types"] = [TicketTypeRule("GA", 4), TicketTypeRule("VIP", 2)]
    with pytest.raises(CatalogRuleBroken, match=message):
        check_event(**args)


def test_ticket_codes_are_long_random_and_url_safe():
    codes = {new_ticket_code() for _ in range(2_000)}
    assert len(codes) == 2_000
    assert all(len(c) == 22 and c.replace("-", "").replace("_", "").isalnum() for c in codes)


def test_fault_switches():
    SagaFaults().before_post("tok_fail_after_charge")  # off by default: nothing happens
    with pytest.raises(InjectedFailure):
        SagaFaults(fail_after_charge_token=True).before_post("tok_fail_after_charge")
    SagaFaults(fail_after_charge_token=True).before_post("tok_ok")
    SagaFaults(crash_after="post").after("charge")  # another step: no crash
    with pytest.raises(ValueError):
        SagaFaults(crash_after="tickets")


def test_charging_completes_in_one_step_only_together_with_the_sale_and_tickets():
    """charging -> completed is the one transaction that records the charge, books the sale and
    issues the tickets; the step-by-step path is still allowed, skipping a step of it is not."""
    ensure_transition(S.CHARGING, S.COMPLETED)
    for a, b in [(S.PENDING, S.COMPLETED), (S.CHARGED, S.COMPLETED), (S.PENDING, S.POSTED)]:
        with pytest.raises(IllegalTransition):
            ensure_transition(a, b)
