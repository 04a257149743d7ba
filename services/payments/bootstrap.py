"""Payments: catalog, holds, checkout saga, double-entry ledger, tickets, refunds (design §6).

The one place that wires this service: real adapters for a running process, fakes for unit
tests. Commands are registered on ``runtime.router``, consumers with ``runtime.add_consumer``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from libs.runtime import ServiceRuntime, configure_service_logging
from libs.settings import Settings, get_settings

SERVICE = "payments"
MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: Settings) -> ServiceRuntime:
    """The payments service's runtime with its commands and consumers registered."""
    runtime = ServiceRuntime(SERVICE, settings, migrations_dir=MIGRATIONS)
    return runtime


def main() -> None:
    """Entry point of ``python -m services.payments``."""
    settings = get_settings()
    configure_service_logging(SERVICE, settings)
    asyncio.run(build(settings).run_until_stopped())
