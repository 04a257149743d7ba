"""The payment-processor port, and the deterministic fake processor for local runs and tests.

The port is deliberately small so a real provider's adapter fits it: charge with an
idempotency key, look a charge up by that key (to settle a timeout), refund a charge in whole.
``merchant`` is the tenant on whose behalf the platform charges (a connected account at a real
provider). Outcomes other than success are typed exceptions the saga reacts to.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

import asyncpg

from libs.db import CONNECTION_ERRORS, create_pool
from libs.db import tenant_transaction_on
from services.payments.domain.money import Money

__all__ = [
    "Charge",
    "Refund",
    "PaymentDeclined",
    "ProcessorTimeout",
    "ProcessorUnavailable",
    "PaymentProcessor",
    "FakeProcessor",
    "TOKEN_OK",
    "TOKEN_DECLINE",
    "TOKEN_TIMEOUT",
    "TOKEN_FAIL_AFTER_CHARGE",
]

TOKEN_OK = "tok_ok"
TOKEN_DECLINE = "tok_decline"
TOKEN_TIMEOUT = "tok_timeout"
TOKEN_FAIL_AFTER_CHARGE = "tok_fail_after_charge"


@dataclass(frozen=True, slots=True)
class Charge:
    """Money the processor took for us."""

    charge_id: str
    amount: Money


@dataclass(frozen=True, slots=True)
class Refund:
    """Money the processor gave back."""

    refund_id: str
    charge_id: str
    amount: Money


class PaymentDeclined(Exception):
    """The processor refused the payment; nothing was charged."""

    def __init__(self, reason: str = "card_declined") -> None:
        super().__init__(reason)
        self.reason = reason


class ProcessorTimeout(Exception):
    """No answer in time: the charge may or may not have happened (look it up by key)."""


class ProcessorUnavailable(Exception):
    """The processor could not be reached; nothing is known to have happened."""


class PaymentProcessor(Protocol):
    """What the saga needs from a payment processor."""

    async def charge(
        self, merchant: UUID, idempotency_key: str, amount: Money, token: str
    ) -> Charge:
        """Take ``amount`` with the buyer's ``token``. The same ``idempotency_key`` never
        charges twice: a repeat returns the first charge. Raises ``PaymentDeclined``,
        ``ProcessorTimeout`` or ``ProcessorUnavailable``."""
        ...

    async def find_charge(self, merchant: UUID, idempotency_key: str) -> Charge | None:
        """The charge made with ``idempotency_key``, or None if there is none. Raises
        ``ProcessorTimeout``/``ProcessorUnavailable`` when that cannot be known now."""
        ...

    async def refund(self, merchant: UUID, charge_id: str, amount: Money) -> Refund:
        """Give ``amount`` (the whole charge) back; a repeat returns the first refund.
        Raises ``ProcessorTimeout``/``ProcessorUnavailable``."""
        ...


class FakeProcessor:
    """A deterministic processor driven by the ``payment_token`` (design §7):

    * ``tok_ok``: the charge succeeds;
    * ``tok_decline``: declined, nothing charged;
    * ``tok_timeout``: the charge *is taken* but the answer is lost (``ProcessorTimeout``),
      the worst case a timeout can hide; the saga must find it and settle it;
    * ``tok_fail_after_charge``: the charge succeeds; the saga's next step then fails (see
      ``adapters.faults``), to exercise compensation;
    * anything else: declined as ``invalid_token``.

    Its books are two tables in the payments schema (``fake_processor_charges`` and
    ``_refunds``), written through its own connection pool (it stands for a remote system, so
    it never borrows the saga's connections), which is what lets a test compare "charges minus
    refunds" with the ledger's receivable across process restarts.
    """

    def __init__(self, pool: asyncpg.Pool | None = None) -> None:
        self._pool_or_none = pool
        self._owns_pool = False

    async def open(self, dsn: str, *, schema: str = "payments") -> None:
        """Connect its own small pool (it must not compete with the saga for connections)."""
        self._pool_or_none = await create_pool(dsn, schema=schema, min_size=1, max_size=8)
        self._owns_pool = True

    async def close(self) -> None:
        """Close the pool opened by ``open``."""
        if self._owns_pool and self._pool_or_none is not None:
            await self._pool_or_none.close()
        self._pool_or_none = None

    @property
    def _pool(self) -> asyncpg.Pool:
        if self._pool_or_none is None:
            raise RuntimeError("FakeProcessor used before open()")
        return self._pool_or_none

    async def charge(
        self, merchant: UUID, idempotency_key: str, amount: Money, token: str
    ) -> Charge:
        """See ``PaymentProcessor.charge``."""
        if token == TOKEN_DECLINE:
            raise PaymentDeclined("card_declined")
        if token not in (TOKEN_OK, TOKEN_TIMEOUT, TOKEN_FAIL_AFTER_CHARGE):
            raise PaymentDeclined("invalid_token")
        if amount.amount <= 0:
            raise ValueError("a charge takes a positive amount")
        try:
            # one statement, its own tenant transaction (migrations/0002): insert the charge,
            # or return the first one made with this key
            row = await self._pool.fetchrow(
                "SELECT * FROM fake_processor_charge($1, $2, $3, $4, $5, $6)",
                merchant, f"ch_{secrets.token_hex(12)}", idempotency_key,
                amount.amount, amount.currency, token,
            )  # fmt: skip
        except CONNECTION_ERRORS as exc:
            raise ProcessorUnavailable(str(exc)) from exc
        if token == TOKEN_TIMEOUT:
            raise ProcessorTimeout(f"no answer for {idempotency_key}")
        return Charge(row["id"], Money(row["amount"], row["currency"]))

    async def find_charge(self, merchant: UUID, idempotency_key: str) -> Charge | None:
        """See ``PaymentProcessor.find_charge``."""
        try:
            async with self._pool.acquire() as conn, tenant_transaction_on(conn, merchant, readonly=True):
                row = await conn.fetchrow(
                    "SELECT id, amount, currency FROM fake_processor_charges "
                    "WHERE idempotency_key = $1",
                    idempotency_key,
                )
        except CONNECTION_ERRORS as exc:
            raise ProcessorUnavailable(str(exc)) from exc
        return None if row is None else Charge(row["id"], Money(row["amount"], row["currency"]))

    async def refund(self, merchant: UUID, charge_id: str, amount: Money) -> Refund:
        """See ``PaymentProcessor.refund``."""
        try:
            async with self._pool.acquire() as conn, tenant_transaction_on(conn, merchant):
                charge = await conn.fetchrow(
                    "SELECT amount, currency FROM fake_processor_charges WHERE id = $1", charge_id
                )
                if charge is None:
                    raise ValueError(f"no charge {charge_id}")
                if (charge["amount"], charge["currency"]) != (amount.amount, amount.currency):
                    raise ValueError("only whole refunds are supported")
                row = await conn.fetchrow(
                    "INSERT INTO fake_processor_refunds (organization_id, id, charge_id, amount) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id, charge_id) DO NOTHING "
                    "RETURNING id",
                    merchant, f"re_{secrets.token_hex(12)}", charge_id, amount.amount,
                )  # fmt: skip
                refund_id = row["id"] if row else await conn.fetchval(
                    "SELECT id FROM fake_processor_refunds WHERE charge_id = $1", charge_id
                )
        except CONNECTION_ERRORS as exc:
            raise ProcessorUnavailable(str(exc)) from exc
        return Refund(refund_id, charge_id, amount)

    async def net_charged(self, merchant: UUID) -> dict[str, int]:
        """Charges minus refunds per currency for ``merchant`` (what reconciliation compares
        with the ledger's processor receivable)."""
        async with self._pool.acquire() as conn, tenant_transaction_on(conn, merchant, readonly=True):
            rows = await conn.fetch(
                "SELECT c.currency, sum(c.amount) - coalesce(sum(r.amount), 0) AS net "
                "FROM fake_processor_charges c "
                "LEFT JOIN fake_processor_refunds r "
                "  ON r.organization_id = c.organization_id AND r.charge_id = c.id "
                "GROUP BY c.currency"
            )
        return {r["currency"]: int(r["net"]) for r in rows}
