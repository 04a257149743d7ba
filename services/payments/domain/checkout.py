"""The checkout and its saga: states, the transitions allowed between them, which step runs
next, hold expiry and pricing.

Happy path::

    pending -> charging -> completed -> (refunding -> refunded)
    (step by step: pending -> charging -> charged -> posted -> completed)

``charging`` is written *before* the processor is called (so a crash leaves a trace to
reconcile by idempotency key). After the charge, recording it, booking the sale, issuing the
tickets and queueing the events are one transaction (``charging -> completed``): a crash
before it commits leaves ``charging``, settled by looking the charge up by its key.
``charged`` and ``posted`` are the same work in separate steps; sagas found in them are
resumed from there. Anything that goes wrong once money may
have been taken goes through ``compensating`` (refund the charge, reverse any posted entry,
release the holds) to ``failed``; no path leads to tickets without money or money without
tickets or a refund. Tickets, their events and ``completed`` commit in one transaction (the
outbox rule: a state change and its events commit together), so there is no separate
"ticketed" state to resume from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from services.payments.domain.money import CurrencyMismatch, Money

__all__ = [
    "CheckoutStatus",
    "SagaStep",
    "FailureReason",
    "IllegalTransition",
    "TRANSITIONS",
    "UNFINISHED",
    "TERMINAL",
    "ensure_transition",
    "next_step",
    "hold_expires_at",
    "is_expired",
    "PricedItem",
    "price_items",
]


class CheckoutStatus(StrEnum):
    """Where a checkout is (``libs.contracts.payments.CheckoutStatus`` spells the same)."""

    PENDING = "pending"
    CHARGING = "charging"
    CHARGED = "charged"
    POSTED = "posted"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    FAILED = "failed"
    EXPIRED = "expired"
    REFUNDING = "refunding"
    REFUNDED = "refunded"


class SagaStep(StrEnum):
    """The work that moves a checkout out of its current state."""

    CHARGE = "charge"  # charging: ask (or, when resuming, look up) the processor
    POST = "post"  # charged: book the sale
    ISSUE = "issue"  # posted: issue tickets, consume holds, publish
    COMPENSATE = "compensate"  # compensating: refund the charge, reverse, release
    REFUND = "refund"  # refunding: refund, reverse, cancel tickets
    NONE = "none"  # nothing to do (waiting for the buyer, or finished)


class FailureReason(StrEnum):
    """Why a completion failed."""

    DECLINED = "declined"
    PROCESSOR_TIMEOUT = "processor_timeout"
    PROCESSING_FAILED = "processing_failed"
    INTERRUPTED = "interrupted"


class IllegalTransition(ValueError):
    """A state change the saga does not allow (a bug or a lost race)."""


S = CheckoutStatus
TRANSITIONS: dict[CheckoutStatus, frozenset[CheckoutStatus]] = {
    S.PENDING: frozenset({S.CHARGING, S.EXPIRED}),
    # charging -> completed is the one transaction that records the charge, books the sale
    # and issues the tickets together (neither without the others)
    S.CHARGING: frozenset({S.CHARGED, S.COMPLETED, S.COMPENSATING, S.FAILED}),
    S.CHARGED: frozenset({S.POSTED, S.COMPENSATING}),
    S.POSTED: frozenset({S.COMPLETED, S.COMPENSATING}),
    S.COMPENSATING: frozenset({S.FAILED}),
    S.COMPLETED: frozenset({S.REFUNDING}),
    S.REFUNDING: frozenset({S.REFUNDED}),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
    S.REFUNDED: frozenset(),
}
"""Every allowed state change; anything else is ``IllegalTransition``."""

UNFINISHED: frozenset[CheckoutStatus] = frozenset(
    {S.CHARGING, S.CHARGED, S.POSTED, S.COMPENSATING, S.REFUNDING}
)
"""States a saga must not be left in: resumed at startup and by the periodic sweep."""

TERMINAL: frozenset[CheckoutStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)

_STEP = {
    S.CHARGING: SagaStep.CHARGE,
    S.CHARGED: SagaStep.POST,
    S.POSTED: SagaStep.ISSUE,
    S.COMPENSATING: SagaStep.COMPENSATE,
    S.REFUNDING: SagaStep.REFUND,
}


def ensure_transition(current: CheckoutStatus, new: CheckoutStatus) -> None:
    """Raise ``IllegalTransition`` unless the saga may go from ``current`` to ``new``."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a checkout cannot go from {current} to {new}")


def next_step(status: CheckoutStatus) -> SagaStep:
    """The step that runs in ``status`` (``NONE`` for pending and every terminal state)."""
    return _STEP.get(status, SagaStep.NONE)


def hold_expires_at(now: datetime, ttl_seconds: float) -> datetime:
    """When holds placed at ``now`` lapse."""
    if ttl_seconds <= 0:
        raise ValueError("a hold lasts a positive time")
    return now + timedelta(seconds=ttl_seconds)


def is_expired(status: CheckoutStatus, expires_at: datetime, now: datetime) -> bool:
    """Whether a checkout's holds have lapsed: only a pending checkout expires (once the buyer
    has started paying, the saga owns the holds until it ends)."""
    return status is S.PENDING and expires_at <= now


@dataclass(frozen=True, slots=True)
class PricedItem:
    """A checkout line with its unit price."""

    ticket_type: str
    quantity: int
    unit_price: Money

    @property
    def subtotal(self) -> Money:
        """Unit price times quantity."""
        return self.unit_price.times(self.quantity)


def price_items(items: list[PricedItem]) -> Money:
    """The total of a checkout; every line must be in the same currency."""
    if not items:
        raise ValueError("a checkout has at least one item")
    total = Money.zero(items[0].unit_price.currency)
    for item in items:
        if item.quantity <= 0:
            raise ValueError("quantities are positive")
        try:
            total = total + item.subtotal
        except CurrencyMismatch as exc:
            raise CurrencyMismatch("a checkout is paid in one currency") from exc
    return total
