"""Payments: catalog, holds, checkout saga, double-entry ledger, tickets, refunds (design §6).

The one place that wires this service: the PostgreSQL store, the payment processor (the fake
one for now: local runs and tests), fault injection (off unless a test asks), the saga, the
background sweep, and the commands on ``runtime.router``. On start it resumes every unfinished
saga before serving commands.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from libs.contracts.catalog import EventCreated, TicketCancelled, TicketIssued
from libs.contracts.payments import (
    CheckoutCompleted,
    CheckoutCreated,
    CheckoutExpired,
    CheckoutFailed,
    LedgerEntryPosted,
    RefundCompleted,
)
from libs.db import CONNECTION_ERRORS, service_dsn
from libs.runtime import ServiceRuntime, configure_service_logging, run_service
from libs.settings import Settings, get_settings
from services.payments.adapters.faults import SagaFaults
from services.payments.adapters.postgres import PaymentsStore, create_store_pool
from services.payments.adapters.processor import FakeProcessor, PaymentProcessor
from services.payments.handlers import register_commands
from services.payments.jobs import Sweeper
from services.payments.saga import SERVICE, CheckoutSaga

__all__ = ["build", "main", "SERVICE", "MIGRATIONS"]

MIGRATIONS = Path(__file__).parent / "migrations"


def _setting(name: str, explicit: Any, settings: Settings) -> Any:
    # an explicit argument (tests) wins over the settings
    return explicit if explicit is not None else getattr(settings, name)


def build(
    settings: Settings,
    *,
    hold_ttl_seconds: float | None = None,
    sweep_interval_seconds: float | None = None,
    platform_fee_bps: int | None = None,
    processor: PaymentProcessor | None = None,
    crash_after: str | None = None,
    resume_idle_seconds: float = 10.0,
    charge_grace_seconds: float = 30.0,
) -> ServiceRuntime:
    """The payments service's runtime with its commands and background work registered.

    Keyword arguments override the settings (tests use them). ``processor`` replaces the fake
    processor.
    """
    ttl = float(_setting("hold_ttl_seconds", hold_ttl_seconds, settings))
    interval = float(_setting("hold_sweep_interval_seconds", sweep_interval_seconds, settings))
    fee_bps = int(_setting("platform_fee_bps", platform_fee_bps, settings))
    crash = _setting("payments_crash_after", crash_after, settings)
    if settings.environment == "prod":
        crash = None  # a test switch must never kill production

    # Payments keeps nothing in Redis: its health does not depend on it.
    runtime = ServiceRuntime(SERVICE, settings, migrations_dir=MIGRATIONS, uses_redis=False)
    store = PaymentsStore()
    fake = FakeProcessor() if processor is None else None
    saga = CheckoutSaga(
        store,
        processor or fake,  # type: ignore[arg-type]
        # tok_fail_after_charge belongs to the fake processor's vocabulary (design §7)
        SagaFaults(fail_after_charge_token=fake is not None, crash_after=crash),
        platform_fee_bps=fee_bps,
        charge_grace_seconds=charge_grace_seconds,
    )
    sweeper = Sweeper(
        store, saga, interval_seconds=interval, resume_idle_seconds=resume_idle_seconds
    )
    register_commands(runtime.router, store, saga, hold_ttl_seconds=ttl)

    store_pool: list[asyncpg.Pool] = []

    async def started() -> None:
        assert runtime.pool is not None and settings.database_url
        dsn = settings.service_database_url or service_dsn(
            settings.database_url, SERVICE, settings.db_role_password
        )
        # the store's own pool: sagas never wait behind the outbox relay or the health check
        store_pool.append(await create_store_pool(dsn))
        store.attach(store_pool[0])
        if fake is not None:
            await fake.open(dsn)
        # design §6: a restart resumes every unfinished saga before taking new work
        await sweeper.resume_unfinished(idle_seconds=0)
        await sweeper.expire_due()
        sweeper.start()
        runtime.log.info("payments_ready", hold_ttl_seconds=ttl, sweep_interval_seconds=interval,
                         processor="fake" if fake else type(processor).__name__,
                         crash_after=crash)  # fmt: skip

    async def stopping() -> None:
        await sweeper.stop()
        if fake is not None:
            await fake.close()
        while store_pool:
            pool = store_pool.pop()
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (TimeoutError, *CONNECTION_ERRORS):
                pool.terminate()  # a connection still busy: stopping must not hang

    runtime.publishes(
        EventCreated, TicketIssued, TicketCancelled, CheckoutCreated, CheckoutCompleted,
        CheckoutFailed, CheckoutExpired, LedgerEntryPosted, RefundCompleted,
    )
    runtime.on_start(started)
    runtime.on_stop(stopping)
    return runtime


def main() -> None:
    """Entry point of ``python -m services.payments``."""
    settings = get_settings()
    configure_service_logging(SERVICE, settings)
    run_service(build(settings))
