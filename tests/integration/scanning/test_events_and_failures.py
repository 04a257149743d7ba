"""Events through the outbox (exactly one scan.accepted per accepted scan, also across a
SIGKILL of the service or of the NATS node leading the stream), coalesced occupancy.changed,
and the degraded modes."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import ConsumerConfig

from libs.contracts.scanning import ScanAccepted
from libs.envelope import Envelope
from libs.errors import Unavailable
from libs.servers import PostgresServer
from libs.subjects import EVENTS_STREAM
from services.scanning.bootstrap import build


async def _events(js, subject: str, expect: int | None = None, timeout: float = 20.0) -> list[Envelope]:
    """Every event on ``subject`` (waits until ``expect`` are there)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            # one replica, in memory: a reader's consumer. As the stream's three (on a cluster)
            # its creation waits for a raft group of three, and right after a node was lost it
            # outlasted the 15 s API timeout now and then (about one run of the folder in five)
            sub = await js.pull_subscribe(subject, stream=EVENTS_STREAM,
                                          config=ConsumerConfig(num_replicas=1, mem_storage=True))
        except nats.errors.TimeoutError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            continue  # the cluster is still electing: ask again
        out: list[Envelope] = []
        try:
            while True:
                try:
                    msgs = await sub.fetch(500, timeout=0.3)
                except (nats.errors.TimeoutError, TimeoutError):
                    break
                out += [Envelope.from_bytes(m.data) for m in msgs]
        finally:
            await sub.unsubscribe()
        if expect is None or len(out) >= expect or asyncio.get_running_loop().time() > deadline:
            return out
        await asyncio.sleep(0.2)


async def test_every_accepted_scan_has_exactly_one_event(venue_factory, nc):
    v = await venue_factory(tickets=20)
    decisions = await asyncio.gather(*(v.scan(code, dev=n) for n, code in enumerate(v.tickets * 2)))
    accepted = {d.scan_id for d in decisions if d.result == "accepted"}
    assert len(accepted) == 20
    events = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.scan.accepted", expect=20)
    await asyncio.sleep(0.3)
    events = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.scan.accepted")
    assert sorted(str(ScanAccepted.from_envelope(e).scan_id) for e in events) == sorted(map(str, accepted))
    rejected = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.scan.rejected", expect=20)
    assert len(rejected) == 20
    e = events[0]
    assert e.actor.type == "device" and e.actor.organization_id == v.org
    assert e.correlation_id.startswith("corr-") and e.org_id == v.org


async def test_events_leave_on_the_relays_own_connection(scanning, seed, nc):
    # a relay pass (dozens of publishes, then their acks) must not sit in the connection that
    # carries the command replies
    v = await seed(tickets=3)
    assert scanning.outbox_nc is not None and scanning.outbox_nc is not scanning.nc
    published_before = scanning.outbox_nc.stats["out_msgs"]
    for code in v.tickets:
        assert (await v.scan(code)).result == "accepted"
    events = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.scan.accepted", expect=3)
    assert len(events) == 3
    assert scanning.outbox_nc.stats["out_msgs"] - published_before >= 3
    assert (await scanning.health())["checks"]["nats"] is True


async def test_the_service_wakes_its_relay_without_notifying(start_service, seed, nc, outbox_notifications):
    # scanning's commits do not NOTIFY (migration 0004): the relay must be woken by the
    # service itself. With a poll interval of an hour, only that wake can publish in time.
    await start_service(build, outbox_poll_seconds=3600.0)
    v = await seed(tickets=2)
    notified = await outbox_notifications("scanning")
    js = nc.jetstream()
    # a rejected scan changes no occupancy: only the decision's own wake publishes it
    rejected = await v.scan("TKT-unknown")
    assert rejected.reason == "unknown_ticket"
    events = await _events(js, f"vge.evt.{v.org}.scanning.scan.rejected", expect=1)
    assert [e.data["scan_id"] for e in events] == [str(rejected.scan_id)]
    # the occupancy publisher's row comes after the scan's: its own wake publishes it
    accepted = await v.scan(v.tickets[0])
    assert accepted.result == "accepted"
    changed = await _events(js, f"vge.evt.{v.org}.scanning.occupancy.changed", expect=1)
    assert [e.data["inside"] for e in changed] == [1]
    assert notified == []


async def test_occupancy_changed_is_coalesced(venue_factory, nc):
    v = await venue_factory(tickets=300)
    await asyncio.gather(*(v.scan(code, dev=n % 30) for n, code in enumerate(v.tickets)))
    js = nc.jetstream()
    subject = f"vge.evt.{v.org}.scanning.occupancy.changed"

    async def latest_inside() -> int:
        evs = await _events(js, subject)
        return max((e.data["version"], e.data["inside"]) for e in evs)[1] if evs else -1

    deadline = asyncio.get_running_loop().time() + 10
    while await latest_inside() != 300:
        assert asyncio.get_running_loop().time() < deadline, "latest occupancy never published"
        await asyncio.sleep(0.1)
    events = await _events(js, subject)
    assert 1 <= len(events) < 100  # coalesced: far fewer events than scans
    assert all(e.data["capacity"] == 1000 for e in events)


async def test_the_occupancy_publisher_asks_postgresql_only_after_an_admission(scanning, seed, nc):
    v = await seed(tickets=1)
    store = scanning.components["access"].store
    calls: list[int] = []
    publish = store.publish_occupancy_changes

    async def counted(*args, **kwargs) -> int:
        calls.append(await publish(*args, **kwargs))
        return calls[-1]

    store.publish_occupancy_changes = counted
    await asyncio.sleep(1.0)
    assert len(calls) <= 1  # idle: a sweep at most (it was 10 calls a second)
    await v.scan(v.tickets[0])
    changed = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.occupancy.changed", expect=1)
    assert [e.data["inside"] for e in changed] == [1]
    # published by a call the admission woke (it may also take another test's leftovers: the
    # scanning schema is the session's)
    assert calls and max(calls) >= 1


async def test_an_admissions_occupancy_changed_does_not_wait_for_the_relays_turn(scanning, seed, nc,
                                                                                  monkeypatch):
    """Dashboards wait for occupancy.changed (within ~100 ms): its wake-up of the relay is
    urgent, not for the relay's next turn (``min_pass_interval``, a minute here)."""
    v = await seed(tickets=1)
    monkeypatch.setattr(scanning.relay, "_min_pass_interval", 60.0)
    try:
        await asyncio.sleep(0.3)  # (a pass under way ends, and the next turn is a minute away)
        assert (await v.scan(v.tickets[0])).result == "accepted"
        changed = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.occupancy.changed", expect=1,
                                timeout=15.0)
        assert [e.data["inside"] for e in changed] == [1]
    finally:
        # the relay is the session's: no later test may find it waiting for a turn a minute away
        monkeypatch.undo()
        scanning.relay.wake(urgent=True)


async def test_a_change_another_replica_left_unpublished_is_published_by_the_sweep(scanning, seed, nc):
    v = await seed(tickets=1)
    # as if a replica committed an admission and died before its publisher's next tick: the
    # occupancy changed and is marked dirty, and no process here was woken for it
    conn = await asyncpg.connect(v.admin_dsn)
    try:
        await conn.execute(
            "INSERT INTO scanning.occupancy (organization_id, event_id, inside, entries, exits, version, "
            "updated_at) VALUES ($1, $2, 7, 7, 0, 1, now())", v.org, v.event_id)
        await conn.execute("INSERT INTO scanning.occupancy_dirty (organization_id, event_id) VALUES ($1, $2)",
                           v.org, v.event_id)
    finally:
        await conn.close()
    changed = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.occupancy.changed", expect=1)
    assert [e.data["inside"] for e in changed] == [7]


async def test_postgres_down_is_unavailable_never_accepted(start_service, seed, tmp_path: Path, server_urls):
    pg = PostgresServer(tmp_path / "pg", fsync=False).start()
    try:
        await start_service(build, database_url=pg.url)
        v = await seed(tickets=2, database_url=pg.url)  # this instance's own database
        assert (await v.scan(v.tickets[0])).result == "accepted"
        pg.stop()
        with pytest.raises(Unavailable):
            await v.scan(v.tickets[1])
        with pytest.raises(Unavailable):
            await v.occupancy()
        pg.start()
        deadline = asyncio.get_running_loop().time() + 15
        while True:  # the pool reconnects; the scan was never admitted, so it is admitted now
            try:
                d = await v.scan(v.tickets[1])
                break
            except Unavailable:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
        assert d.result == "accepted"
    finally:
        pg.stop()


async def test_sigkill_mid_load_loses_and_duplicates_no_event(seed, nc, service_process, admin_dsn):
    scanning = service_process("scanning", VGE_LOG_LEVEL="WARNING")
    await scanning.healthy()
    v = await seed(tickets=600)
    replies: list = []

    async def device(n: int) -> None:
        for code in v.tickets[n::16]:
            try:
                replies.append(await v.scan(code, dev=n))
            except Unavailable:
                pass  # the service died under us; the device would retry

    load = asyncio.gather(*(device(n) for n in range(16)))
    # kill once the load is under way, not after a fixed time: a slow start must not leave
    # nothing answered (nor a fast one everything)
    async with asyncio.timeout(20):
        while len(replies) < 100:
            await asyncio.sleep(0.005)
    scanning.kill()
    killed_after = len(replies)
    await load
    await service_process("scanning", VGE_LOG_LEVEL="WARNING").healthy()
    # devices retry what went unanswered, with new nonces: the authority decides
    answered = {r.scan_id for r in replies}
    for code in v.tickets:
        await v.scan(code, dev=99)
    conn = await asyncpg.connect(admin_dsn)
    try:
        accepted = {str(r[0]) for r in await conn.fetch(
            "SELECT scan_id FROM scanning.scans WHERE organization_id = $1 AND result = 'accepted'", v.org)}
        unpublished_query = "SELECT count(*) FROM scanning.outbox_unpublished WHERE organization_id = $1"
        deadline = asyncio.get_running_loop().time() + 20
        while await conn.fetchval(unpublished_query, v.org):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert len(accepted) == 600  # every ticket admitted exactly once
    assert {str(r.scan_id) for r in replies if r.result == "accepted"} <= accepted
    assert answered and killed_after < 600  # the kill really came in the middle of the load
    events = await _events(nc.jetstream(), f"vge.evt.{v.org}.scanning.scan.accepted", expect=600)
    ids = [str(ScanAccepted.from_envelope(e).scan_id) for e in events]
    assert len(ids) == len(set(ids)) == 600
    assert set(ids) == accepted


async def test_losing_the_nats_node_leading_the_stream_mid_load_loses_and_duplicates_no_event(
    nats_cluster, service_process, seed, admin_dsn
):
    # a 3-node cluster (deploy/nats/nats-cluster.conf) with the streams on three nodes, and the
    # node leading VGE_EVENTS killed in the middle of a load
    tickets, devices = 400, 16
    scanning = service_process("scanning", **nats_cluster.service_env, VGE_LOG_LEVEL="WARNING")
    await scanning.healthy()
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=nats_cluster.JS_TIMEOUT)
        v = await seed(tickets=tickets, via=nc, via_js=js)
        replies = []

        async def device(n: int) -> None:
            for i, code in enumerate(v.tickets[n::devices]):
                nonce = f"dev{n}-{i}"
                while True:  # a gate retries an unanswered scan with the same nonce
                    try:
                        replies.append(await v.scan(code, dev=n, nonce=nonce))
                        break
                    except Unavailable:
                        pass

        load = asyncio.gather(*(device(n) for n in range(devices)))
        async with asyncio.timeout(30):
            while len(replies) < 100:
                await asyncio.sleep(0.005)
        lost = await nats_cluster.leader(js, EVENTS_STREAM)
        os.kill(lost.pid, signal.SIGKILL)
        lost_after = len(replies)
        async with asyncio.timeout(60):
            await load

        assert lost_after < tickets  # the node was lost in the middle of the load
        assert len(replies) == tickets and {r.result for r in replies} == {"accepted"}
        conn = await asyncpg.connect(admin_dsn)
        try:
            accepted = {str(r[0]) for r in await conn.fetch(
                "SELECT scan_id FROM scanning.scans WHERE organization_id = $1 AND result = 'accepted'",
                v.org)}
            unpublished = "SELECT count(*) FROM scanning.outbox_unpublished WHERE organization_id = $1"
            async with asyncio.timeout(30):  # the relay gets through once a new leader is elected
                while await conn.fetchval(unpublished, v.org):
                    await asyncio.sleep(0.1)
        finally:
            await conn.close()
        assert accepted == {str(r.scan_id) for r in replies}  # one admission per ticket
        events = await _events(js, f"vge.evt.{v.org}.scanning.scan.accepted", expect=tickets, timeout=60)
        ids = [str(ScanAccepted.from_envelope(e).scan_id) for e in events]
        assert len(ids) == len(set(ids)) == tickets
        assert set(ids) == accepted
    finally:
        await nc.close()
