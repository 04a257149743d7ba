"""The gateway after its NATS connection was away: what was published meanwhile never reaches it
(core NATS), so a live dashboard reads the current occupancy again and cached credentials are
dropped (a revocation broadcast was missed). The platform here runs on a NATS server of this
module's own, which the tests stop and start again.

"Meanwhile" is a change this replica could not hear of: on a real deployment, scans let in and a
credential revoked through another gateway replica whose NATS node stayed up. Here the changes
are written to the database while NATS is down, which is the same thing for this replica."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Iterator

import asyncpg
import pytest

from libs.servers import NatsServer
from libs.settings import Settings


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("outage-nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def platform_settings(platform_settings: Settings, own_nats: NatsServer) -> Settings:
    """The suite's settings on this module's NATS (the e2e ``platform`` starts on them)."""
    # a credential cache long enough that only the reconnect can be what drops an entry
    return platform_settings.model_copy(update={"nats_url": own_nats.url, "credential_cache_seconds": 300.0})


async def _while_nats_is_down(own_nats: NatsServer, platform: Any, change: Any) -> None:
    """Stop NATS until every service noticed, make ``change``, start NATS again."""
    own_nats.stop()
    async with asyncio.timeout(15):
        while any(r.nc.is_connected for r in platform.runtimes.values()):
            await asyncio.sleep(0.05)
    await change()
    own_nats.start()


async def _next_occupancy(lines: Any, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        async for line in lines:
            if line.startswith("data:"):
                return json.loads(line[5:])
    raise AssertionError("the stream ended")


async def test_a_dashboard_reads_the_current_occupancy_again_after_the_gateways_nats_was_away(
    tenant, platform, own_nats, admin_dsn
):
    event = await tenant.create_event(tickets=3)
    device = await tenant.device(event["event_id"])
    sold = await tenant.buy(event["event_id"], quantity=1)
    await tenant.scan_until_known(device, event["event_id"], sold["tickets"][0]["ticket_code"])
    async with tenant.http.stream("GET", f"/v1/events/{event['event_id']}/occupancy/stream",
                                  headers=tenant.auth()) as stream:  # fmt: skip
        lines = stream.aiter_lines()
        assert (await _next_occupancy(lines, 5))["inside"] == 1

        async def two_more_let_in_elsewhere() -> None:
            conn = await asyncpg.connect(admin_dsn)
            try:
                await conn.execute(
                    "UPDATE scanning.occupancy SET inside = inside + 2, entries = entries + 2, "
                    "updated_at = now() WHERE organization_id = $1 AND event_id = $2",
                    tenant.org, uuid.UUID(event["event_id"]))  # fmt: skip
            finally:
                await conn.close()

        await _while_nats_is_down(own_nats, platform, two_more_let_in_elsewhere)
        # no occupancy.changed is coming for it: only the re-read after the reconnect shows it
        caught_up = await _next_occupancy(lines, 20)
        assert (caught_up["inside"], caught_up["entries"]) == (3, 3)


async def test_a_credential_revoked_while_the_gateways_nats_was_away_is_refused_after(
    tenant, platform, own_nats, admin_dsn
):
    issued = await tenant.post("/v1/api-keys", {"name": "ops", "role": "admin"})
    assert issued.status_code == 201, issued.text
    key, key_id = issued.json()["api_key"], issued.json()["api_key_id"]
    assert (await tenant.get("/v1/api-keys", token=key)).status_code == 200  # now cached

    async def revoked_elsewhere() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute("UPDATE gateway.api_keys SET revoked_at = now() WHERE id = $1",
                               uuid.UUID(key_id))  # fmt: skip
        finally:
            await conn.close()

    await _while_nats_is_down(own_nats, platform, revoked_elsewhere)
    async with asyncio.timeout(20):
        while (status := (await tenant.get("/v1/api-keys", token=key)).status_code) == 200:
            await asyncio.sleep(0.1)
    assert status == 401
    # and a credential that is still good gets in again (from the database this time)
    assert (await tenant.get("/v1/api-keys")).status_code == 200
