"""Who may read the audit log, and what a query returns: one tenant's records only (row-level
security), for its owners and admins, and for platform admins, whose read is itself recorded."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from libs.actor import Actor, ActorType, Role
from libs.db import service_dsn
from libs.envelope import Envelope
from libs.errors import Forbidden, InvalidInput, NotFound
from libs.subjects import EVENTS_STREAM
from services.audit.bootstrap import build


@pytest.fixture
async def two_tenants(start_service, bench):
    """A running audit service and two tenants with 12 records each."""
    await start_service(build)
    a, b = uuid.uuid4(), uuid.uuid4()
    await bench.publish([bench.sample_event(org, n) for org in (a, b) for n in range(12)])
    await bench.wait_for_records(a, 12)
    await bench.wait_for_records(b, 12)
    return a, b


async def test_owner_and_admin_read_their_tenant_page_by_page(bench, two_tenants):
    a, _ = two_tenants
    for role in (Role.OWNER, Role.ADMIN):
        seen, cursor = [], None
        while True:
            page = await bench.query(a, bench.owner_of(a, role), limit=5,
                                     **({"cursor": cursor} if cursor else {}))
            seen += page["records"]
            cursor = page["next"]
            if cursor is None:
                break
        assert [r["seq"] for r in seen] == list(range(1, 13))
        assert {r["organization_id"] for r in seen} == {str(a)}


async def test_filters_select_by_resource_actor_action_correlation_and_time(bench, two_tenants):
    a, _ = two_tenants
    everything = (await bench.query(a))["records"]

    async def seqs(**filters) -> list[int]:
        return [r["seq"] for r in (await bench.query(a, **filters))["records"]]

    assert await seqs(resource_type="scan", resource_id="scan-3") == [4]
    assert await seqs(actor_user_id="device-1") == [r["seq"] for r in everything if r["actor"]["user_id"] == "device-1"]
    assert len(await seqs(actor_user_id="device-1")) == 4
    assert await seqs(action="scan.accepted") == list(range(1, 13))
    assert await seqs(action="ticket.issued") == []
    assert await seqs(correlation_id=everything[6]["correlation_id"]) == [7]
    since, until = everything[3]["occurred_at"], everything[8]["occurred_at"]
    assert await seqs(since=since, until=until) == [4, 5, 6, 7, 8]
    with pytest.raises(InvalidInput):
        await bench.query(a, since="2025-01-01T00:00:00")  # no timezone: which instant?
    with pytest.raises(InvalidInput):
        await bench.query(a, limit=10_000)


async def test_a_tenant_never_sees_another_tenants_records(bench, two_tenants):
    a, b = two_tenants
    b_records = (await bench.query(b))["records"]
    intruder = bench.owner_of(a)
    # guessing the other tenant's ids in filters: nothing, and no error that confirms them
    for filters in (
        {"resource_type": "scan", "resource_id": b_records[0]["resource_id"]},
        {"correlation_id": b_records[0]["correlation_id"]},
        {"cursor": "0", "limit": 500},
    ):
        page = await bench.query(a, intruder, **filters)
        assert all(r["organization_id"] == str(a) for r in page["records"])
        assert not {r["event_id"] for r in page["records"]} & {r["event_id"] for r in b_records}
    assert (await bench.query(a, intruder, correlation_id=b_records[0]["correlation_id"]))["records"] == []
    # naming the other tenant is not_found, for reading and verifying alike
    with pytest.raises(NotFound):
        await bench.query(b, intruder)
    with pytest.raises(NotFound):
        await bench.verify(b, intruder)
    # nothing was recorded in b's chain by those attempts
    assert (await bench.stats(b)).count == 12


async def test_roles_without_audit_access_are_forbidden(bench, two_tenants):
    a, _ = two_tenants
    refused = [
        bench.owner_of(a, Role.STAFF),
        bench.owner_of(a, Role.VIEWER),
        bench.owner_of(a, Role.SCANNER_ONLY),
        Actor(user_id="dev-1", organization_id=a, role=None, type=ActorType.DEVICE),
        Actor(user_id="key-1", organization_id=a, role=None, type=ActorType.API_KEY),
        bench.PLATFORM_STAFF,
    ]
    for actor in refused:
        with pytest.raises(Forbidden):
            await bench.query(a, actor)
        with pytest.raises(Forbidden):
            await bench.verify(a, actor)
    assert (await bench.verify(a, bench.owner_of(a, Role.ADMIN)))["ok"] is True


async def test_platform_admin_read_of_a_tenant_is_recorded_in_its_chain(bench, two_tenants):
    _, b = two_tenants
    published = await bench.js.pull_subscribe(
        f"vge.evt.{b}.audit.>", stream=EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        page = await bench.query(b, bench.PLATFORM_ADMIN, action="scan.accepted", limit=20)
        assert len(page["records"]) == 12

        trail = (await bench.query(b, action="audit.cross_tenant_read"))["records"]
        assert len(trail) == 1
        read = trail[0]
        assert read["seq"] == 13 and read["actor"] == {
            "user_id": "ops-1", "organization_id": None, "role": None,
            "is_platform_admin": True, "is_platform_staff": False, "type": "user",
        }
        assert (read["resource_type"], read["resource_id"]) == ("organization", str(b))
        assert read["change"]["command"] == "query"
        assert read["change"]["filters"] == {"action": "scan.accepted", "limit": 20}

        verified = await bench.verify(b, bench.PLATFORM_ADMIN)  # also a cross-tenant read
        assert (verified["ok"], verified["last_seq"]) == (True, 14)

        # published like every event (through the outbox)...
        msgs: list = []
        while len(msgs) < 2:
            msgs += await published.fetch(2 - len(msgs), timeout=10)
        assert sorted(Envelope.from_bytes(m.data).event_id for m in msgs) == sorted(
            uuid.UUID(r["event_id"]) for r in (await bench.query(b, action="audit.cross_tenant_read"))["records"]
        )
        # ...and once the audit consumer has been past them, they are still recorded once
        await bench.wait_consumed(max(m.metadata.sequence.stream for m in msgs))
        stats = await bench.stats(b)
        assert (stats.count, stats.distinct_events, stats.head_seq) == (14, 14, 14)
    finally:
        await published.unsubscribe()


async def test_the_record_of_a_read_wakes_the_relay_without_notifying(start_service, bench,
                                                                    outbox_notifications):
    # the audit log's own events (a platform admin's read) are committed in a transaction of
    # no tenant: it wakes the service's relay itself, no NOTIFY (libs/sql/0002). With an hour's
    # poll interval, only that wake-up publishes in time.
    await start_service(build, outbox_poll_seconds=3600.0)
    org = uuid.uuid4()
    await bench.publish([bench.sample_event(org, 0)])
    await bench.wait_for_records(org, 1)
    notified = await outbox_notifications("audit")
    published = await bench.js.pull_subscribe(
        f"vge.evt.{org}.audit.>", stream=EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    try:
        await bench.query(org, bench.PLATFORM_ADMIN)
        msgs = await published.fetch(1, timeout=10)
        assert Envelope.from_bytes(msgs[0].data).type == "audit.cross_tenant_read"
        assert notified == []
    finally:
        await published.unsubscribe()


async def test_platform_admin_must_name_the_tenant(bench, two_tenants):
    with pytest.raises(InvalidInput):
        await bench.commands.request(
            "vge.cmd.audit.query", {}, actor=bench.PLATFORM_ADMIN, org_id=None, correlation_id="c"
        )


async def test_row_level_security_holds_for_the_service_login(bench, two_tenants, admin_dsn, platform_settings):
    a, b = two_tenants
    conn = await asyncpg.connect(service_dsn(admin_dsn, "audit", platform_settings.db_role_password))
    try:
        assert await conn.fetchval("SELECT count(*) FROM audit.records WHERE organization_id = $1", a) == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('vge.org_id', $1, true)", str(a))
            assert await conn.fetchval(
                "SELECT count(*) FROM audit.records WHERE organization_id = ANY($1::uuid[])", [a, b]
            ) == 12
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "INSERT INTO audit.chain_heads (organization_id, last_seq, last_hash) "
                    "VALUES ($1, 0, 'x')", b,
                )
    finally:
        await conn.close()
