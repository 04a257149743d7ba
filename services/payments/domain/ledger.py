"""Double-entry bookkeeping: the chart of accounts, balanced journal entries, reversals and
the trial balance.

The database enforces the same balance rule (a deferred constraint trigger) and refuses UPDATE
and DELETE of posted entries; this module is the service's own check, so an unbalanced entry
is a bug found before any SQL runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal
from uuid import UUID

from services.payments.domain.money import Money

__all__ = [
    "Account",
    "AccountKind",
    "CHART_OF_ACCOUNTS",
    "Side",
    "ReferenceType",
    "JournalLine",
    "JournalEntry",
    "UnbalancedEntry",
    "sale_entry",
    "reversal_of",
    "trial_balance",
    "account_balances",
]


class Account(StrEnum):
    """The accounts every tenant's ledger has."""

    PROCESSOR_RECEIVABLE = "processor_receivable"  # money the processor holds for the tenant
    TICKET_REVENUE = "ticket_revenue"
    PLATFORM_FEES = "platform_fees"  # the platform's cut, owed to the platform
    REFUNDS_PAYABLE = "refunds_payable"  # refunds promised but not yet paid out


class AccountKind(StrEnum):
    """What an account is, for reports (the sign convention is the same for all)."""

    ASSET = "asset"
    LIABILITY = "liability"
    REVENUE = "revenue"


CHART_OF_ACCOUNTS: dict[Account, tuple[str, AccountKind]] = {
    Account.PROCESSOR_RECEIVABLE: ("Processor receivable", AccountKind.ASSET),
    Account.TICKET_REVENUE: ("Ticket revenue", AccountKind.REVENUE),
    Account.PLATFORM_FEES: ("Platform fees payable", AccountKind.LIABILITY),
    Account.REFUNDS_PAYABLE: ("Refunds payable", AccountKind.LIABILITY),
}
"""Every tenant gets these accounts when its first event is created."""


class Side(StrEnum):
    """Which column of the ledger a line is in."""

    DEBIT = "debit"
    CREDIT = "credit"

    @property
    def opposite(self) -> Side:
        """Credit for debit and the other way round (a reversal swaps every line)."""
        return Side.CREDIT if self is Side.DEBIT else Side.DEBIT


ReferenceType = Literal["checkout", "refund", "compensation"]
"""What an entry records: a sale (checkout), a customer refund, or the undoing of a sale whose
tickets could not be issued (compensation)."""


class UnbalancedEntry(ValueError):
    """A journal entry whose debits and credits differ (in some currency), or that has fewer
    than two lines or a non-positive amount."""


@dataclass(frozen=True, slots=True)
class JournalLine:
    """One line: an amount on one side of one account."""

    account: str
    side: Side
    amount: Money

    def __post_init__(self) -> None:
        if self.amount.amount <= 0:
            raise UnbalancedEntry(f"line amounts are positive, got {self.amount.amount}")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A balanced set of lines about one reference; immutable once built."""

    entry_id: UUID
    reference_type: ReferenceType
    reference_id: UUID
    description: str
    lines: tuple[JournalLine, ...]
    reverses_entry_id: UUID | None = None

    def __post_init__(self) -> None:
        if len(self.lines) < 2:
            raise UnbalancedEntry("an entry needs at least two lines")
        for currency, (debit, credit) in _totals(self.lines).items():
            if debit != credit:
                raise UnbalancedEntry(
                    f"entry {self.entry_id} does not balance in {currency}: "
                    f"debit {debit} != credit {credit}"
                )


def _totals(lines: Iterable[JournalLine]) -> dict[str, tuple[int, int]]:
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        sums[line.amount.currency][0 if line.side is Side.DEBIT else 1] += line.amount.amount
    return {currency: (d, c) for currency, (d, c) in sums.items()}


def sale_entry(entry_id: UUID, checkout_id: UUID, total: Money, fee: Money) -> JournalEntry | None:
    """The entry of a paid checkout: the processor owes us ``total``, of which ``fee`` is the
    platform's and the rest ticket revenue. ``None`` for a free checkout (nothing to book)."""
    if total.is_zero:
        return None
    if fee.amount < 0 or fee.amount > total.amount:
        raise UnbalancedEntry(f"a fee of {fee.amount} does not fit a total of {total.amount}")
    lines = [JournalLine(Account.PROCESSOR_RECEIVABLE, Side.DEBIT, total)]
    revenue = total - fee
    if not revenue.is_zero:
        lines.append(JournalLine(Account.TICKET_REVENUE, Side.CREDIT, revenue))
    if not fee.is_zero:
        lines.append(JournalLine(Account.PLATFORM_FEES, Side.CREDIT, fee))
    return JournalEntry(
        entry_id=entry_id,
        reference_type="checkout",
        reference_id=checkout_id,
        description=f"sale of checkout {checkout_id}",
        lines=tuple(lines),
    )


def reversal_of(
    entry: JournalEntry, entry_id: UUID, reference_type: ReferenceType, description: str
) -> JournalEntry:
    """The entry that undoes ``entry``: the same lines on the opposite sides. Posted entries
    are never edited; a correction or a refund is this."""
    return JournalEntry(
        entry_id=entry_id,
        reference_type=reference_type,
        reference_id=entry.reference_id,
        description=description,
        lines=tuple(JournalLine(l.account, l.side.opposite, l.amount) for l in entry.lines),
        reverses_entry_id=entry.entry_id,
    )


def account_balances(lines: Iterable[JournalLine]) -> dict[tuple[str, str], tuple[int, int]]:
    """(debit total, credit total) per (account, currency)."""
    sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        sums[(line.account, line.amount.currency)][0 if line.side is Side.DEBIT else 1] += (
            line.amount.amount
        )
    return {key: (d, c) for key, (d, c) in sums.items()}


def trial_balance(lines: Iterable[JournalLine]) -> dict[str, int]:
    """Debits minus credits per currency over every line: zero in a sound ledger."""
    return {currency: d - c for currency, (d, c) in _totals(lines).items()}
