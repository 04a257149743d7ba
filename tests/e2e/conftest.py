"""The whole platform for HTTP tests: all four services in this process on the session's real
servers, the gateway on a real port, and a fresh tenant per test (tenants keep tests apart)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, AsyncIterator

import httpx
import pytest

from libs.runtime import ServiceRuntime
from libs.settings import Settings
from services.audit.bootstrap import build as build_audit
from services.gateway.bootstrap import build as build_gateway
from services.gateway.cli import create_tenant
from services.payments.bootstrap import build as build_payments
from services.scanning.bootstrap import build as build_scanning


@dataclass
class Platform:
    """The running services and the gateway's address."""

    settings: Settings
    url: str
    runtimes: dict[str, ServiceRuntime]


@pytest.fixture(scope="module")
async def platform(platform_settings: Settings) -> AsyncIterator[Platform]:
    settings = platform_settings.model_copy(update={
        "jwt_issuer": "https://id.test", "jwt_hs256_secret": "e2e-secret-e2e-secret-e2e-secret!",
        "rate_limit_per_second": 100_000, "sse_heartbeat_seconds": 1.0})  # fmt: skip
    runtimes: dict[str, ServiceRuntime] = {}
    try:
        for name, build in (("scanning", build_scanning), ("payments", build_payments),
                            ("audit", build_audit), ("gateway", build_gateway)):  # fmt: skip
            runtime = build(settings)
            await runtime.start()
            runtimes[name] = runtime
        yield Platform(settings, f"http://127.0.0.1:{runtimes['gateway'].http_port}", runtimes)
    finally:
        for runtime in reversed(list(runtimes.values())):
            await runtime.stop()


@dataclass
class Tenant:
    """A fresh organization with its owner key and an HTTP client."""

    org: uuid.UUID
    owner_key: str
    http: httpx.AsyncClient

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.owner_key}"}

    async def post(self, path: str, body: Any = None, *, token: str | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(path, json=body, headers={**self.auth(token), **(headers or {})})

    async def get(self, path: str, *, token: str | None = None, **params: Any) -> httpx.Response:
        return await self.http.get(path, headers=self.auth(token), params=params or None)

    async def create_event(self, *, tickets: int = 50, reentry: bool = False,
                           price: int = 15000) -> dict[str, Any]:
        now = datetime.now(UTC)
        r = await self.post("/v1/events", {
            "name": "Vryfees", "starts_at": (now + timedelta(hours=1)).isoformat(),
            "ends_at": (now + timedelta(hours=6)).isoformat(), "capacity": 1000,
            "reentry_allowed": reentry,
            "ticket_types": [{"code": "GA", "name": "General", "price": price, "currency": "ZAR",
                              "quantity": tickets}]})  # fmt: skip
        assert r.status_code == 201, r.text
        return r.json()

    async def device(self, event_id: str | None = None, gate: str = "North") -> str:
        r = await self.post("/v1/devices", {"name": f"gate-{gate}", "event_id": event_id, "gate": gate})
        assert r.status_code == 201, r.text
        enrolled = await self.http.post("/v1/devices/enrol",
                                        json={"enrolment_token": r.json()["enrolment_token"]})  # fmt: skip
        assert enrolled.status_code == 200, enrolled.text
        return enrolled.json()["device_token"]

    async def buy(self, event_id: str, quantity: int = 1, token: str = "tok_ok") -> dict[str, Any]:
        r = await self.post("/v1/checkouts", {"event_id": event_id, "customer_email": "a@b.test",
                                              "items": [{"ticket_type": "GA", "quantity": quantity}]})  # fmt: skip
        assert r.status_code == 201, r.text
        done = await self.post(f"/v1/checkouts/{r.json()['checkout_id']}/complete",
                               {"payment_token": token}, headers={"Idempotency-Key": uuid.uuid4().hex})  # fmt: skip
        assert done.status_code == 200, done.text
        return done.json()

    async def occupancy_when_known(self, event_id: str, timeout: float = 15.0) -> dict[str, Any]:
        """The event's occupancy, once scanning's registry has the event: it learns of a new
        event from payments' ``event.created``, a moment after the event was created, and
        answers 404 until then."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            r = await self.get(f"/v1/events/{event_id}/occupancy")
            if r.status_code == 200:
                return r.json()
            assert r.status_code == 404 and asyncio.get_running_loop().time() < deadline, r.text
            await asyncio.sleep(0.05)

    async def scan_until_known(self, device_token: str, event_id: str, code: str,
                               timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        """Scan until scanning's registry has the ticket (it learns of sales from events)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            r = await self.post("/v1/scans", {"event_id": event_id, "ticket_code": code, **fields},
                                token=device_token)  # fmt: skip
            assert r.status_code == 200, r.text
            body = r.json()
            if body.get("reason") not in ("unknown_ticket", "wrong_event"):
                return body
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.1)


@pytest.fixture
async def tenant(platform: Platform) -> AsyncIterator[Tenant]:
    org, key = await create_tenant(platform.settings, f"Tenant {uuid.uuid4().hex[:6]}")
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        yield Tenant(org, key, http)


@pytest.fixture
async def other_tenant(platform: Platform) -> AsyncIterator[Tenant]:
    org, key = await create_tenant(platform.settings, f"Other {uuid.uuid4().hex[:6]}")
    async with httpx.AsyncClient(base_url=platform.url, timeout=30) as http:
        yield Tenant(org, key, http)
