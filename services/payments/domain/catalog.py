"""Rules an event and its ticket types must satisfy before they are stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["CatalogRuleBroken", "TicketTypeRule", "check_event"]


class CatalogRuleBroken(ValueError):
    """An event or ticket type that cannot be sold as described."""


@dataclass(frozen=True, slots=True)
class TicketTypeRule:
    """What the rules look at in a ticket type."""

    code: str
    quantity: int
    zones: tuple[str, ...] = ()


def check_event(
    starts_at: datetime,
    ends_at: datetime,
    capacity: int,
    zones: list[str],
    ticket_types: list[TicketTypeRule],
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
) -> None:
    """Raise ``CatalogRuleBroken`` unless the event makes sense.

    The stock of all ticket types together may not exceed the capacity: inventory is what
    stops overselling, so the capacity must bound it.
    """
    if ends_at <= starts_at:
        raise CatalogRuleBroken("an event ends after it starts")
    if valid_from and valid_until and valid_until <= valid_from:
        raise CatalogRuleBroken("valid_until must be after valid_from")
    if len(set(zones)) != len(zones):
        raise CatalogRuleBroken("zones are listed once each")
    codes = [t.code for t in ticket_types]
    if len(set(codes)) != len(codes):
        raise CatalogRuleBroken("ticket type codes are unique within an event")
    for t in ticket_types:
        unknown = set(t.zones) - set(zones)
        if unknown:
            raise CatalogRuleBroken(
                f"ticket type {t.code} names zones the event does not have: {sorted(unknown)}"
            )
    stock = sum(t.quantity for t in ticket_types)
    if stock > capacity:
        raise CatalogRuleBroken(f"ticket types offer {stock} tickets for a capacity of {capacity}")
