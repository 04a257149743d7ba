"""Events payments publishes about its catalog and tickets, and scanning consumes (design §5, §6).

Scanning keeps its own ticket registry from these; payments publishes exactly these shapes.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar
from uuid import UUID

from pydantic import BaseModel, Field

from libs.contracts import EventData

__all__ = ["TicketTypeInfo", "EventCreated", "TicketIssued", "TicketCancelled"]


class TicketTypeInfo(BaseModel):
    """A ticket type as scanning needs it (and the price, for everyone else)."""

    code: str = Field(min_length=1, max_length=64)
    name: str
    price: int = Field(ge=0, description="Integer minor units (cents).")
    currency: str = Field(default="ZAR", min_length=3, max_length=3)
    quantity: int = Field(ge=0)
    zones: list[str] = Field(
        default_factory=list, description="Zones this type may enter; empty means every zone."
    )


class EventCreated(EventData):
    """An event (a show, a match) was created with its ticket types."""

    event_type: ClassVar[str] = "event.created"
    service: ClassVar[str] = "payments"

    event_id: UUID
    name: str
    starts_at: datetime
    ends_at: datetime
    capacity: int = Field(ge=0)
    reentry_allowed: bool = False
    valid_from: datetime | None = Field(
        default=None, description="Gates admit from here; default: starts_at minus 6 hours."
    )
    valid_until: datetime | None = Field(
        default=None, description="Gates admit until here; default: ends_at."
    )
    zones: list[str] = Field(default_factory=list)
    ticket_types: list[TicketTypeInfo] = Field(default_factory=list)


class TicketIssued(EventData):
    """A ticket was issued (sold) and may now be scanned."""

    event_type: ClassVar[str] = "ticket.issued"
    service: ClassVar[str] = "payments"

    ticket_code: str = Field(min_length=8, max_length=128)
    event_id: UUID
    ticket_type: str
    checkout_id: UUID | None = None
    issued_at: datetime


class TicketCancelled(EventData):
    """A ticket was cancelled (e.g. refunded): the gate must reject it as ``cancelled``."""

    event_type: ClassVar[str] = "ticket.cancelled"
    service: ClassVar[str] = "payments"

    ticket_code: str
    event_id: UUID
    reason: str = "refunded"
    cancelled_at: datetime
