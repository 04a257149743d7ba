"""Fixtures for scanning's integration tests: a running service, a seeded tenant, devices."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from libs.actor import Actor, ActorType
from libs.commands import CommandClient
from libs.contracts.catalog import EventCreated, TicketCancelled, TicketIssued, TicketTypeInfo
from libs.contracts.scanning import ScanDecision
from libs.jetstream import ensure_streams
from services.scanning.bootstrap import build


def device(org: uuid.UUID, n: int = 1) -> Actor:
    """A gate device of ``org``."""
    return Actor(user_id=f"device-{n}", organization_id=org, role=None, type=ActorType.DEVICE)


@dataclass
class Venue:
    """A tenant with one event and its tickets, as scanning's registry knows them."""

    org: uuid.UUID
    event_id: uuid.UUID
    tickets: list[str]
    commands: CommandClient
    admin_dsn: str
    js: Any
    other_event_id: uuid.UUID = field(default_factory=uuid.uuid4)

    async def scan(self, code: str, *, dev: int = 1, direction: str = "entry", gate: str = "A",
                   nonce: str | None = None, event_id: uuid.UUID | None = None, **extra: Any) -> ScanDecision:
        body = {"event_id": str(event_id or self.event_id), "ticket_code": code,
                "direction": direction, "gate": gate, "nonce": nonce or uuid.uuid4().hex, **extra}
        reply = await self.commands.request("vge.cmd.scanning.scan", body, actor=device(self.org, dev),
                                            org_id=self.org, correlation_id=f"corr-{uuid.uuid4().hex[:8]}")
        return ScanDecision.model_validate(reply)

    async def sync(self, scans: list[dict[str, Any]], dev: int = 1) -> list[dict[str, Any]]:
        reply = await self.commands.request("vge.cmd.scanning.sync", {"scans": scans},
                                            actor=device(self.org, dev), org_id=self.org,
                                            correlation_id="sync", timeout=30)
        return reply["results"]

    async def occupancy(self) -> dict[str, Any]:
        return await self.commands.request("vge.cmd.scanning.occupancy", {"event_id": str(self.event_id)},
                                           actor=device(self.org), org_id=self.org, correlation_id="occ")

    async def cancel(self, code: str) -> None:
        env = TicketCancelled(ticket_code=code, event_id=self.event_id, cancelled_at=datetime.now(UTC)
                              ).envelope(self.org, Actor.system("payments", self.org), "cancel")
        await _publish(self.js, env)
        await _wait_sql(self.admin_dsn, "SELECT status = 'cancelled' FROM scanning.tickets "
                        "WHERE organization_id = $1 AND ticket_code = $2", self.org, code)


async def _publish(js: Any, env: Any) -> None:
    await js.publish(f"vge.evt.{env.org_id}.payments.{env.type}", env.to_bytes(),
                     headers={"Nats-Msg-Id": str(env.event_id)})


async def _wait_sql(dsn: str, sql: str, *args: Any, timeout: float = 15.0) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await conn.fetchval(sql, *args)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not true in time: {sql}")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def seed_venue(js: Any, commands: CommandClient, admin_dsn: str, *, tickets: int = 5,
                     reentry: bool = False, starts_in: timedelta = timedelta(hours=1),
                     zones: dict[str, list[str]] | None = None, capacity: int = 1000) -> Venue:
    """Publish payments' events for a fresh tenant and wait until the registry has them."""
    org, event_id = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    zones = zones or {"GA": []}
    system = Actor.system("payments", org)
    created = EventCreated(
        event_id=event_id, name="Test Fest", starts_at=now + starts_in, ends_at=now + starts_in + timedelta(hours=5),
        capacity=capacity, reentry_allowed=reentry,
        zones=sorted({z for zs in zones.values() for z in zs}),
        ticket_types=[TicketTypeInfo(code=t, name=t, price=10000, quantity=1000, zones=z) for t, z in zones.items()],
    )
    await _publish(js, created.envelope(org, system, "seed"))
    types = list(zones)
    codes = [f"TKT-{uuid.uuid4().hex}" for _ in range(tickets)]
    for n, code in enumerate(codes):
        issued = TicketIssued(ticket_code=code, event_id=event_id, ticket_type=types[n % len(types)], issued_at=now)
        await _publish(js, issued.envelope(org, system, "seed"))
    await _wait_sql(admin_dsn, "SELECT count(*) = $2 FROM scanning.tickets WHERE organization_id = $1",
                    org, tickets)
    await _wait_sql(admin_dsn, "SELECT count(*) = 1 FROM scanning.events WHERE organization_id = $1", org)
    return Venue(org, event_id, codes, commands, admin_dsn, js)


@pytest.fixture
async def scanning(start_service):
    """One scanning service instance (in-process)."""
    return await start_service(build)


@pytest.fixture
async def seed(nc, commands, signer, admin_dsn):
    """``await seed(tickets=..., reentry=..., ...)``: a fresh tenant with an event and tickets
    (needs a running scanning service to apply them). ``via=`` another NATS connection (a
    cluster's, say), with its JetStream context ``via_js=`` if one was made, publishes them and
    sends the venue's commands there."""
    js = nc.jetstream()
    await ensure_streams(js)

    async def make(*, database_url: str | None = None, via: Any = None, via_js: Any = None,
                   **kwargs: Any) -> Venue:
        if via is not None:
            return await seed_venue(via_js or via.jetstream(), CommandClient(via, signer),
                                    database_url or admin_dsn, **kwargs)
        return await seed_venue(js, commands, database_url or admin_dsn, **kwargs)

    return make


@pytest.fixture
async def venue_factory(scanning, seed):
    """``seed`` with one scanning instance running."""
    return seed
