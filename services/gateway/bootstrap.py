"""Gateway: the one door in (design §3, §7). HTTP API and SSE for devices, dashboards and admins;
every request becomes a signed command on NATS.

The one place that wires the gateway: real adapters for a running process, fakes for tests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI

from libs.runtime import ServiceRuntime, configure_service_logging
from libs.settings import Settings, get_settings

SERVICE = "gateway"
MIGRATIONS = Path(__file__).parent / "migrations"


def build(settings: Settings) -> ServiceRuntime:
    """The gateway's runtime: its HTTP API is served on ``VGE_GATEWAY_PORT``."""
    app = FastAPI(title="VoelgoedEvents API", version="1")
    return ServiceRuntime(
        SERVICE, settings, migrations_dir=MIGRATIONS, http_app=app, http_port=settings.gateway_port
    )


def main() -> None:
    """Entry point of ``python -m services.gateway``."""
    settings = get_settings()
    configure_service_logging(SERVICE, settings)
    asyncio.run(build(settings).run_until_stopped())
