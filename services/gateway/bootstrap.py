"""Gateway: the one door in (design §3, §7). HTTP API and SSE for devices, dashboards and admins;
every request becomes a signed command on NATS.

The one place that wires the gateway: its store, credential checks, rate limits, command client
and live feeds, on the shared service runtime (health, metrics, outbox relay, migrations).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from libs.commands import CommandClient
from libs.context import ContextSigner, load_private_key
from libs.contracts.gateway import (
    ApiKeyCreated,
    ApiKeyRevoked,
    DeviceEnrolled,
    DeviceRegistered,
    DeviceRevoked,
    DeviceTokenRolled,
    OrganizationCreated,
    OrganizationReadByPlatform,
)
from libs.runtime import MissingConfiguration, ServiceRuntime, configure_service_logging, run_service
from libs.settings import Settings, get_settings
from services.gateway.adapters.jwt import JwtVerifier
from services.gateway.adapters.nats_feeds import OccupancyFeed, RevocationBroadcast
from services.gateway.adapters.postgres import SERVICE, GatewayStore
from services.gateway.adapters.redis_limits import RateLimiter
from services.gateway.api import Edge, Gateway, install_error_handlers, install_routes
from services.gateway.handlers import Authenticator, CredentialAdmin

__all__ = ["build", "main", "SERVICE"]

MIGRATIONS = Path(__file__).parent / "migrations"

_DESCRIPTION = """The VoelgoedEvents public API (v1).

Send `Authorization: Bearer <API key | device token | user JWT>` on every call except device
enrolment. Errors are `application/problem+json` with a stable `code`. Every mutating call
honours an `Idempotency-Key` header: the same key and credential replays the first response.
Every response carries `X-Correlation-Id`.
"""


def build(settings: Settings) -> ServiceRuntime:
    """The gateway's runtime: its HTTP API is served on ``VGE_GATEWAY_PORT``."""
    if not settings.context_private_key:
        raise MissingConfiguration("gateway needs VGE_CONTEXT_PRIVATE_KEY (or run `vge up`)")
    signer = ContextSigner(load_private_key(settings.context_private_key))
    app = FastAPI(title="VoelgoedEvents API", version="1", description=_DESCRIPTION)
    runtime = ServiceRuntime(SERVICE, settings, migrations_dir=MIGRATIONS, http_app=app,
                             http_port=settings.gateway_port)  # fmt: skip
    runtime.publishes(OrganizationCreated, ApiKeyCreated, ApiKeyRevoked, DeviceRegistered,
                      DeviceEnrolled, DeviceTokenRolled, DeviceRevoked,
                      OrganizationReadByPlatform)  # fmt: skip
    install_error_handlers(app)
    # the edge wraps everything, also the runtime's /healthz and /metrics
    app.add_middleware(Edge, max_body=settings.max_request_bytes)
    routes_installed = False

    async def wire() -> None:
        nonlocal routes_installed
        assert runtime.pool is not None and runtime.nc is not None
        store = GatewayStore(runtime.pool)
        auth = Authenticator(store, JwtVerifier(settings), ttl=settings.credential_cache_seconds)
        revocations = RevocationBroadcast(runtime.nc, auth.forget)
        await revocations.start()
        runtime.on_stop(revocations.stop)
        gateway = Gateway(
            store=store, auth=auth,
            credentials=CredentialAdmin(store, revocations,
                                        enrolment_ttl=timedelta(seconds=settings.enrolment_ttl_seconds)),
            commands=CommandClient(runtime.nc, signer, timeout=settings.command_timeout_seconds,
                                   ttl=settings.context_ttl_seconds),
            limits=RateLimiter(runtime.redis, settings.rate_limit_per_second),
            feed=OccupancyFeed(runtime.nc),
            public_url=settings.gateway_public_url or f"http://127.0.0.1:{settings.gateway_port}",
            heartbeat_seconds=settings.sse_heartbeat_seconds,
        )  # fmt: skip
        runtime.components["gateway"] = gateway
        if not routes_installed:  # the HTTP server starts after on_start hooks
            install_routes(app, gateway)
            routes_installed = True

    async def catch_up() -> None:
        # back from a disconnect: what was published meanwhile was missed, so dashboards read
        # the current occupancy again and cached credentials go (a revocation broadcast)
        gateway = runtime.components.get("gateway")
        if gateway is not None:
            await gateway.feed.resync()
            await gateway.auth.forget_all()

    runtime.on_start(wire)
    runtime.on_reconnect(catch_up)
    return runtime


def main() -> None:
    """Entry point of ``python -m services.gateway``."""
    settings = get_settings()
    configure_service_logging(SERVICE, settings)
    run_service(build(settings))
