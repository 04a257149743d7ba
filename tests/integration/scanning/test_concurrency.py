"""Two gates, two replicas, Redis gone or forgetful: one ticket is admitted exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from libs.servers import RedisServer
from services.scanning.bootstrap import build
from services.scanning.domain import claim_key


async def _storm(v, code: str, scans: int = 200, devices: int = 20):
    results = await asyncio.gather(*(
        v.scan(code, dev=n % devices, gate=f"G{n % devices}") for n in range(scans)
    ))
    accepted = [r for r in results if r.result == "accepted"]
    rejected = [r for r in results if r.result == "rejected"]
    return accepted, rejected


def _assert_exactly_once(accepted, rejected, scans: int = 200):
    assert len(accepted) == 1, [r.reason for r in accepted]
    assert len(rejected) == scans - 1
    first = accepted[0]
    assert {r.reason for r in rejected} == {"already_admitted"}
    assert {(r.first_admitted_at, r.first_gate) for r in rejected} == {(first.first_admitted_at, first.first_gate)}
    assert len({r.scan_id for r in accepted + rejected}) == scans


async def _recorded(admin_dsn: str, org, code):
    import asyncpg

    conn = await asyncpg.connect(admin_dsn)
    try:
        return await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE result = 'accepted') AS accepted, count(*) AS scans, "
            "(SELECT entries FROM scanning.tickets WHERE organization_id = $1 AND ticket_code = $2) AS entries, "
            "(SELECT inside FROM scanning.occupancy WHERE organization_id = $1) AS inside "
            "FROM scanning.scans WHERE organization_id = $1 AND ticket_code = $2", org, code)
    finally:
        await conn.close()


async def test_200_scans_of_one_ticket_over_two_replicas(venue_factory, start_service, admin_dsn):
    await start_service(build)  # a second replica next to the fixture's
    v = await venue_factory(tickets=1)
    accepted, rejected = await _storm(v, v.tickets[0])
    _assert_exactly_once(accepted, rejected)
    row = await _recorded(admin_dsn, v.org, v.tickets[0])
    assert dict(row) == {"accepted": 1, "scans": 200, "entries": 1, "inside": 1}


async def test_200_scans_with_redis_down(start_service, seed, admin_dsn, tmp_path: Path):
    redis_server = RedisServer(tmp_path / "redis").start()
    for _ in range(2):
        await start_service(build, redis_url=redis_server.url)
    v = await seed(tickets=2)
    redis_server.stop()
    try:
        accepted, rejected = await _storm(v, v.tickets[0])
        _assert_exactly_once(accepted, rejected)
        row = await _recorded(admin_dsn, v.org, v.tickets[0])
        assert (row["accepted"], row["scans"], row["entries"]) == (1, 200, 1)
    finally:
        redis_server.start()
    # and with Redis back the service goes on deciding correctly
    await asyncio.sleep(1.1)  # the breaker's cooldown
    assert (await v.scan(v.tickets[1])).result == "accepted"
    assert (await v.scan(v.tickets[1], dev=5)).reason == "already_admitted"


async def test_redis_key_deleted_between_scans(start_service, seed, admin_dsn, redis_url):
    replicas = [await start_service(build) for _ in range(2)]
    v = await seed(tickets=1)
    code = v.tickets[0]
    r = aioredis.from_url(redis_url)
    try:
        assert (await v.scan(code)).result == "accepted"
        results = []
        for n in range(40):
            await r.delete(claim_key(v.org, code))
            for rep in replicas:  # and tier 1 forgets too: only the authority is left
                rep.components["access"].cache.forget(v.org, code)
            results += await asyncio.gather(*(v.scan(code, dev=n % 7 + 2) for _ in range(5)))
        assert {(d.result, d.reason) for d in results} == {("rejected", "already_admitted")}
    finally:
        await r.aclose()
    row = await _recorded(admin_dsn, v.org, code)
    assert (row["accepted"], row["scans"], row["entries"]) == (1, 201, 1)


async def test_cancellation_beats_every_replicas_cached_admission(start_service, seed):
    replicas = [await start_service(build) for _ in range(2)]
    v = await seed(tickets=1)
    code = v.tickets[0]
    assert (await v.scan(code)).result == "accepted"
    for _ in range(40):  # until the queue group has sent a duplicate to each replica
        if all(rep.components["access"].cache.get(v.org, code) for rep in replicas):
            break
        await asyncio.gather(*(v.scan(code, dev=n) for n in range(2, 7)))
    assert all(rep.components["access"].cache.get(v.org, code) for rep in replicas)  # both cached it
    await v.cancel(code)
    again = await asyncio.gather(*(v.scan(code, dev=n) for n in range(2, 22)))
    assert {(d.result, d.reason) for d in again} == {("rejected", "cancelled")}
