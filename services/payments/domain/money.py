"""Money as integer minor units with a currency: never floats, never mixed currencies."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Money", "CurrencyMismatch", "DEFAULT_CURRENCY"]

DEFAULT_CURRENCY = "ZAR"
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class CurrencyMismatch(ValueError):
    """Two amounts in different currencies were combined."""


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units (cents) of one ISO 4217 currency."""

    amount: int
    currency: str = DEFAULT_CURRENCY

    def __post_init__(self) -> None:
        # bool is an int subclass: True cents is a bug, not an amount
        if not isinstance(self.amount, int) or isinstance(self.amount, bool):
            raise TypeError(f"money amounts are integer minor units, got {self.amount!r}")
        if not _CURRENCY.match(self.currency):
            raise ValueError(f"not an ISO 4217 currency code: {self.currency!r}")

    @classmethod
    def zero(cls, currency: str = DEFAULT_CURRENCY) -> Money:
        """Nothing, in ``currency``."""
        return cls(0, currency)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}")

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount + other.amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount - other.amount, self.currency)

    def times(self, quantity: int) -> Money:
        """This amount ``quantity`` times (a unit price times a number of tickets)."""
        return Money(self.amount * quantity, self.currency)

    def share_bps(self, basis_points: int) -> Money:
        """``basis_points``/10 000 of this amount, rounded half up to a whole minor unit."""
        if basis_points < 0:
            raise ValueError("basis points cannot be negative")
        return Money((self.amount * basis_points + 5_000) // 10_000, self.currency)

    @property
    def is_zero(self) -> bool:
        """True for no money at all."""
        return self.amount == 0
