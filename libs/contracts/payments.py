"""Commands, replies and events of the payments service (design §6, §7).

Commands travel on ``vge.cmd.payments.<name>``: ``create_event``, ``create_checkout``,
``complete_checkout``, ``refund_checkout``, ``get_checkout``, ``ledger_balances``. Replies carry
exactly the fields of the gateway's HTTP API (design §7) so the gateway maps them one to one;
extra fields are additions, never renames. Money is always integer minor units plus an ISO 4217
currency code.

The catalog and ticket events scanning consumes (``event.created``, ``ticket.issued``,
``ticket.cancelled``) live in :mod:`libs.contracts.catalog`; the events here are payments' own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, Field

from libs.contracts import Command, EventData, Reply
from libs.contracts.catalog import TicketTypeInfo

__all__ = [
    "CheckoutStatus",
    "FailureReason",
    "TicketTypeSpec",
    "CreateEvent",
    "EventView",
    "TicketTypeView",
    "CheckoutItem",
    "CreateCheckout",
    "CheckoutView",
    "CompleteCheckout",
    "IssuedTicket",
    "CheckoutCompletion",
    "RefundCheckout",
    "CheckoutRefund",
    "GetCheckout",
    "GetLedgerBalances",
    "AccountBalance",
    "LedgerBalances",
    "LedgerLine",
    "CheckoutCreated",
    "CheckoutCompleted",
    "CheckoutFailed",
    "CheckoutExpired",
    "LedgerEntryPosted",
    "RefundCompleted",
]

Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")]

MAX_PRICE = 1_000_000_000_000
"""The highest ticket price, in minor units (10 billion in major units)."""

CheckoutStatus = Literal[
    "pending",  # inventory held, waiting for completion (or expiry)
    "charging",  # the processor is being asked for the money
    "charged",  # the money is taken; ledger and tickets follow
    "posted",  # the sale is in the ledger; tickets follow
    "completed",  # tickets issued
    "compensating",  # a step after the charge failed: refunding and releasing
    "failed",  # no tickets and no money kept (declined, timed out, or compensated)
    "expired",  # the holds ran out before completion
    "refunding",  # a refund of a completed checkout is in flight
    "refunded",  # refunded in whole; tickets cancelled
]
"""Every state of a checkout and its saga (the order is the happy path)."""

FailureReason = Literal[
    "declined",  # the processor refused the payment
    "processor_timeout",  # the processor did not answer; any charge it made was refunded
    "processing_failed",  # a step after the charge failed; the charge was refunded
    "interrupted",  # the saga stopped before a charge happened (e.g. a crash) and was closed
]
"""Why a completion failed (``CheckoutCompletion.reason``)."""


# -- catalog ---------------------------------------------------------------------------------


class TicketTypeSpec(Command):
    """A ticket type of a new event: code (unique within the event), price and stock."""

    code: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    name: str = Field(min_length=1, max_length=200)
    # bounded so a checkout's total (20 lines of up to 100) always fits PostgreSQL's bigint
    price: int = Field(ge=0, le=MAX_PRICE, description="Integer minor units (cents).")
    currency: Currency = "ZAR"
    quantity: int = Field(ge=0, le=1_000_000)
    zones: list[str] = Field(
        default_factory=list,
        description="Zones this type may enter (each one of the event's zones); empty: all.",
    )


class CreateEvent(Command):
    """Create an event with its ticket types (``POST /v1/events``; owner/admin)."""

    name: str = Field(min_length=1, max_length=200)
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    capacity: int = Field(ge=0, le=10_000_000)
    reentry_allowed: bool = False
    zones: list[str] = Field(default_factory=list)
    valid_from: AwareDatetime | None = None
    valid_until: AwareDatetime | None = None
    ticket_types: list[TicketTypeSpec] = Field(min_length=1, max_length=100)
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="A retry with the same key returns the first event instead of a second one.",
    )


class TicketTypeView(TicketTypeInfo):
    """A ticket type with what is still for sale."""

    available: int = Field(ge=0, description="quantity minus sold minus held")


class EventView(Reply):
    """An event and its ticket types (``201 {event_id, ...}``)."""

    event_id: UUID
    name: str
    starts_at: datetime
    ends_at: datetime
    capacity: int
    reentry_allowed: bool
    zones: list[str]
    ticket_types: list[TicketTypeView]


# -- checkouts -------------------------------------------------------------------------------


class CheckoutItem(Command):
    """One line of a checkout: how many tickets of which type (by its code)."""

    ticket_type: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=100)


class CreateCheckout(Command):
    """Hold tickets for a buyer until completion or expiry (``POST /v1/checkouts``).

    Sold out is ``conflict`` with ``extra.reason = "sold_out"`` (and ``extra.ticket_type``).
    """

    event_id: UUID
    items: list[CheckoutItem] = Field(min_length=1, max_length=20)
    customer_email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="A retry with the same key returns the first checkout, holding nothing more.",
    )


class CheckoutView(Reply):
    """A checkout (``201 {checkout_id, total, currency, expires_at, status}`` and more)."""

    checkout_id: UUID
    event_id: UUID
    total: int = Field(description="Integer minor units.")
    currency: Currency
    expires_at: datetime
    status: CheckoutStatus
    items: list[CheckoutItem] = Field(default_factory=list)
    reason: FailureReason | None = None
    tickets: list["IssuedTicket"] = Field(default_factory=list)


class CompleteCheckout(Command):
    """Pay for a checkout and issue its tickets (``POST /v1/checkouts/{id}/complete``).

    ``idempotency_key`` is the HTTP ``Idempotency-Key``: completing again with it returns the
    first result and charges nothing more; another key on a checkout already being completed is
    ``conflict``. While the outcome is not yet known (the processor is unreachable) the reply is
    ``unavailable``: retry with the same key.
    """

    checkout_id: UUID
    payment_token: str = Field(min_length=1, max_length=200)
    idempotency_key: str = Field(min_length=1, max_length=200)


class IssuedTicket(BaseModel):
    """A ticket as the buyer receives it."""

    ticket_code: str
    ticket_type: str


class CheckoutCompletion(Reply):
    """``200 {checkout_id, status: completed|failed, tickets: [{ticket_code, ticket_type}], reason?}``."""

    checkout_id: UUID
    status: Literal["completed", "failed"]
    tickets: list[IssuedTicket] = Field(default_factory=list)
    reason: FailureReason | None = None
    total: int = 0
    currency: Currency = "ZAR"


class RefundCheckout(Command):
    """Refund a completed checkout in whole (``POST /v1/checkouts/{id}/refund``; owner/admin).

    Idempotent: refunding a refunded checkout returns the same refund.
    """

    checkout_id: UUID


class CheckoutRefund(Reply):
    """``200 {checkout_id, status: refunded, ...}``."""

    checkout_id: UUID
    status: Literal["refunded"] = "refunded"
    refund_id: str
    amount: int
    currency: Currency
    cancelled_tickets: list[str] = Field(default_factory=list)


class GetCheckout(Command):
    """Read one checkout of the caller's tenant."""

    checkout_id: UUID


# -- ledger ----------------------------------------------------------------------------------


class GetLedgerBalances(Command):
    """The balance of every account of the tenant (``GET /v1/ledger/balances``)."""


class AccountBalance(BaseModel):
    """One account in one currency. ``balance`` is debit minus credit (signed), so the
    balances of a tenant in one currency always add up to zero (the trial balance)."""

    account: str
    debit: int
    credit: int
    balance: int
    currency: Currency


class LedgerBalances(Reply):
    """``{accounts: [{account, debit, credit, balance, currency}]}``."""

    accounts: list[AccountBalance]


# -- events ----------------------------------------------------------------------------------


class LedgerLine(BaseModel):
    """One line of a journal entry."""

    account: str
    side: Literal["debit", "credit"]
    amount: int = Field(gt=0)
    currency: Currency


class CheckoutCreated(EventData):
    """Tickets were held for a buyer until ``expires_at``."""

    event_type: ClassVar[str] = "checkout.created"
    service: ClassVar[str] = "payments"

    checkout_id: UUID
    event_id: UUID
    items: list[CheckoutItem]
    total: int
    currency: Currency
    expires_at: datetime


class CheckoutCompleted(EventData):
    """A checkout was paid and its tickets issued."""

    event_type: ClassVar[str] = "checkout.completed"
    service: ClassVar[str] = "payments"

    checkout_id: UUID
    event_id: UUID
    total: int
    currency: Currency
    charge_id: str | None
    tickets: list[IssuedTicket]
    completed_at: datetime


class CheckoutFailed(EventData):
    """A checkout's completion failed; its holds were released and any charge refunded."""

    event_type: ClassVar[str] = "checkout.failed"
    service: ClassVar[str] = "payments"

    checkout_id: UUID
    event_id: UUID
    reason: FailureReason
    charge_refunded: bool
    failed_at: datetime


class CheckoutExpired(EventData):
    """A checkout was not completed in time; its holds were released."""

    event_type: ClassVar[str] = "checkout.expired"
    service: ClassVar[str] = "payments"

    checkout_id: UUID
    event_id: UUID
    expired_at: datetime


class LedgerEntryPosted(EventData):
    """A balanced journal entry was posted (entries are immutable; corrections reverse)."""

    event_type: ClassVar[str] = "ledger.entry_posted"
    service: ClassVar[str] = "payments"

    entry_id: UUID
    reference_type: Literal["checkout", "refund", "compensation"]
    reference_id: UUID
    reverses_entry_id: UUID | None = None
    lines: list[LedgerLine]
    posted_at: datetime


class RefundCompleted(EventData):
    """A completed checkout was refunded in whole; its tickets are cancelled."""

    event_type: ClassVar[str] = "refund.completed"
    service: ClassVar[str] = "payments"

    checkout_id: UUID
    event_id: UUID
    refund_id: str
    amount: int
    currency: Currency
    cancelled_tickets: list[str]
    refunded_at: datetime


CheckoutView.model_rebuild()
