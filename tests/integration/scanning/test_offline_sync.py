"""Offline sync: applied in scanned_at order, idempotent per (device, nonce), conflicts flagged,
nothing dropped, occupancy matching the scans."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from services.scanning.domain import claim_key, decode_admission


def _scan(v, code, at, *, nonce=None, gate="A", direction="entry", device_result="accepted"):
    return {"event_id": str(v.event_id), "ticket_code": code, "direction": direction, "gate": gate,
            "nonce": nonce or uuid.uuid4().hex, "scanned_at": at.isoformat(), "device_result": device_result}


async def _upload_while_gates_scan(v, scans, online, gates_at=None):
    """Upload ``scans`` to ``v`` from device 9 while a gate per ticket of ``online`` scans it in
    and out (at ``gates_at``, by default the same venue), again and again, until the upload is
    answered. Returns the upload's results, when it began and ended, and every gate scan as
    (sent, answered, direction, decision)."""
    gates_at = gates_at or v
    loop = asyncio.get_running_loop()
    calls: list[tuple[float, float, str, Any]] = []
    upload_done = asyncio.Event()

    async def gate(code: str, dev: int) -> None:
        direction = "entry"
        while not upload_done.is_set():
            started = loop.time()
            d = await gates_at.scan(code, dev=dev, direction=direction)
            calls.append((started, loop.time(), direction, d))
            direction = "exit" if direction == "entry" else "entry"

    gates = [asyncio.create_task(gate(code, 10 + n)) for n, code in enumerate(online)]
    await asyncio.sleep(0.2)
    began = loop.time()
    try:
        results = await v.sync(scans, dev=9)
    finally:
        ended = loop.time()
        upload_done.set()
        await asyncio.gather(*gates)
    return results, began, ended, calls


async def test_same_ticket_admitted_offline_at_two_gates(venue_factory):
    v = await venue_factory(tickets=1)
    code = v.tickets[0]
    t0 = datetime.now(UTC) - timedelta(minutes=10)
    # uploaded later-first, from two devices: the earlier scan still wins
    later = await v.sync([_scan(v, code, t0 + timedelta(minutes=2), gate="South", nonce="s1")], dev=2)
    earlier = await v.sync([_scan(v, code, t0, gate="North", nonce="n1")], dev=1)
    assert (earlier[0]["result"], earlier[0]["conflict"]) == ("accepted", False)
    assert earlier[0]["first_gate"] == "North"
    conn = await asyncpg.connect(v.admin_dsn)
    try:
        rows = await conn.fetch("SELECT gate, result, conflict FROM scanning.scans WHERE organization_id = $1 "
                                "ORDER BY scanned_at", v.org)
        assert [tuple(r) for r in rows] == [("North", "accepted", False), ("South", "accepted", True)]
        assert later[0]["scan_id"] != earlier[0]["scan_id"]
    finally:
        await conn.close()
    occ = await v.occupancy()
    assert (occ["inside"], occ["entries"]) == (1, 1)
    # online, the ticket is admitted at North
    d = await v.scan(code, dev=3)
    assert (d.reason, d.first_gate) == ("already_admitted", "North")


async def test_batch_applied_in_scanned_at_order_with_one_result_per_scan(venue_factory):
    v = await venue_factory(tickets=3, reentry=True)
    a, b, c = v.tickets
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    scans = [  # uploaded out of order on purpose
        _scan(v, a, t0 + timedelta(minutes=5), direction="exit", nonce="a-out"),
        _scan(v, a, t0, nonce="a-in"),
        _scan(v, b, t0 + timedelta(minutes=1), nonce="b-in"),
        _scan(v, b, t0 + timedelta(minutes=2), nonce="b-in-again", gate="B"),  # conflict: inside
        _scan(v, c, t0 + timedelta(minutes=3), direction="exit", nonce="c-out"),  # never entered
        _scan(v, "TKT-forged", t0, nonce="forged"),
        _scan(v, c, t0 + timedelta(minutes=4), nonce="c-turned-away", device_result="rejected"),
    ]
    results = await v.sync(scans)
    assert [r["nonce"] for r in results] == [s["nonce"] for s in scans]
    got = {r["nonce"]: (r["result"], r["reason"], r["conflict"]) for r in results}
    assert got == {
        "a-in": ("accepted", None, False),
        "a-out": ("accepted", None, False),
        "b-in": ("accepted", None, False),
        "b-in-again": ("rejected", "already_admitted", True),
        "c-out": ("rejected", "not_inside", True),
        "forged": ("rejected", "unknown_ticket", True),
        "c-turned-away": ("rejected", None, False),
    }
    occ = await v.occupancy()
    assert (occ["inside"], occ["entries"], occ["exits"]) == (1, 2, 1)


async def test_reupload_changes_nothing(venue_factory):
    v = await venue_factory(tickets=50)
    t0 = datetime.now(UTC) - timedelta(minutes=20)
    scans = [_scan(v, code, t0 + timedelta(seconds=n)) for n, code in enumerate(v.tickets)]
    first = await v.sync(scans)
    before = await v.occupancy()
    again = await v.sync(scans)
    assert [r["scan_id"] for r in again] == [r["scan_id"] for r in first]
    assert all(r["replayed"] for r in again) and not any(r["replayed"] for r in first)
    assert {r["result"] for r in again} == {"accepted"}
    after = await v.occupancy()
    assert (after["inside"], after["entries"]) == (before["inside"], before["entries"]) == (50, 50)
    conn = await asyncpg.connect(v.admin_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM scanning.scans WHERE organization_id = $1", v.org) == 50
    finally:
        await conn.close()


async def test_large_batch_is_one_result_per_scan(venue_factory):
    v = await venue_factory(tickets=500)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    scans = [_scan(v, code, t0 + timedelta(milliseconds=n)) for n, code in enumerate(v.tickets)]
    scans += [_scan(v, code, t0 + timedelta(minutes=30, milliseconds=n), gate="B")
              for n, code in enumerate(v.tickets[:100])]
    results = await v.sync(scans, dev=9)
    assert len(results) == 600
    assert sum(r["result"] == "accepted" for r in results) == 500
    assert sum(r["conflict"] for r in results) == 100
    occ = await v.occupancy()
    assert (occ["inside"], occ["entries"]) == (500, 500)


async def test_a_big_upload_split_in_parts_decides_as_one(venue_factory):
    """Past UPLOAD_PART scans the upload is decided in parts, transactions split by ticket:
    every ticket's scans still meet in order, nothing is applied twice on a re-upload."""
    from services.scanning.adapters.postgres import UPLOAD_PART

    v = await venue_factory(tickets=1100)
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    scans = []
    for n, code in enumerate(v.tickets):
        at = t0 + timedelta(milliseconds=n)
        scans.append(_scan(v, code, at + timedelta(minutes=1), gate="South", nonce=f"s-{n}"))  # later
        scans.append(_scan(v, code, at, gate="North", nonce=f"n-{n}"))
    scans += [_scan(v, f"TKT-forged-{n}", t0, nonce=f"f-{n}") for n in range(100)]
    assert len(scans) > 4 * UPLOAD_PART

    results = await v.sync(scans)
    assert [r["nonce"] for r in results] == [s["nonce"] for s in scans]
    by_nonce = {r["nonce"]: r for r in results}
    for n in range(len(v.tickets)):
        north, south = by_nonce[f"n-{n}"], by_nonce[f"s-{n}"]
        assert (north["result"], north["conflict"], north["first_gate"]) == ("accepted", False, "North")
        assert (south["result"], south["reason"], south["conflict"]) == ("rejected", "already_admitted", True)
    assert all(by_nonce[f"f-{n}"]["reason"] == "unknown_ticket" for n in range(100))
    occ = await v.occupancy()
    assert (occ["inside"], occ["entries"]) == (1100, 1100)

    again = await v.sync(scans)
    assert all(r["replayed"] for r in again)
    assert [r["scan_id"] for r in again] == [r["scan_id"] for r in results]
    conn = await asyncpg.connect(v.admin_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM scanning.scans WHERE organization_id = $1", v.org) == len(scans)
        assert await conn.fetchval("SELECT count(*) FROM scanning.outbox WHERE organization_id = $1 "
                                   "AND subject LIKE '%.scanning.scan.%'", v.org) == len(scans)
    finally:
        await conn.close()
    assert (await v.occupancy())["entries"] == 1100


async def test_online_admissions_of_the_event_go_on_while_an_upload_is_decided(venue_factory):
    """An upload locks its own tickets, and the event's occupancy rows only at its end: the
    gates scanning online meanwhile get their answers, not after the upload. (Occupancy was
    written before the scans decided in order, a ticket's second scan and on, so an upload with
    many of them held every online admission of the event: 0.3-2.7 s for 3,000 of them.)"""
    v = await venue_factory(tickets=1_104, reentry=True)
    uploaded, online = v.tickets[:1_100], v.tickets[1_100:]
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    # 300 tickets scanned once (decided together), 800 scanned twice (decided in order)
    scans = [_scan(v, code, t0 + timedelta(milliseconds=n)) for n, code in enumerate(uploaded)]
    scans += [_scan(v, code, t0 + timedelta(minutes=5, milliseconds=n), gate="B")
              for n, code in enumerate(uploaded[300:])]
    results, began, ended, calls = await _upload_while_gates_scan(v, scans, online)

    assert sum(r["result"] == "accepted" for r in results) == 1_100
    assert sum(r["conflict"] for r in results) == 800
    assert {d.result for *_, d in calls} == {"accepted"}
    # the gates were answered in the middle of the upload. (Measured: answers all through its
    # first 70%, where the last 25-30% is its locked end and its reply being built and read;
    # with occupancy written early, none after its first 20-30%.)
    span = ended - began
    middle = [a for _, a, *_ in calls if began + 0.35 * span <= a <= began + 0.65 * span]
    assert len(middle) >= len(online), (
        f"{len(middle)} online scans answered between {0.35 * span:.2f} and {0.65 * span:.2f} s "
        f"of a {span:.2f} s upload, {len(calls)} in all")
    # and occupancy counts every admission of both
    entries = sum(direction == "entry" for _, _, direction, _ in calls)
    exits = len(calls) - entries
    occ = await v.occupancy()
    assert (occ["entries"], occ["exits"], occ["inside"]) == (1_100 + entries, exits, 1_100 + entries - exits)


async def test_an_upload_does_not_hold_back_the_events_of_scans_decided_meanwhile(venue_factory, nc):
    """The outbox relay publishes in commit order, so it waits for every transaction that began
    before a row's, any tenant's (libs/outbox.py). An upload decided as one or two transactions
    held back the events of every scan decided meanwhile, and the dashboards' occupancy.changed,
    until it ended (10,000 scans: 1.4-1.7 s). Decided in parts (UPLOAD_PART scans, each its own
    transaction), it holds them back for about one part. Here one tenant uploads while another
    tenant's gates scan (and only the gates' events are read: the upload's thousands would take
    this process's time, which its service shares)."""
    v = await venue_factory(tickets=4_000)
    w = await venue_factory(tickets=4, reentry=True)
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    scans = [_scan(v, code, t0 + timedelta(milliseconds=n)) for n, code in enumerate(v.tickets)]
    loop = asyncio.get_running_loop()
    published: dict[str, float] = {}  # scan id -> when its scan.accepted came

    async def on_event(msg) -> None:
        published[json.loads(msg.data)["data"]["scan_id"]] = loop.time()

    sub = await nc.subscribe(f"vge.evt.{w.org}.scanning.scan.accepted", cb=on_event)
    results, began, ended, calls = await _upload_while_gates_scan(v, scans, w.tickets, gates_at=w)
    await sub.unsubscribe()

    assert sum(r["result"] == "accepted" for r in results) == 4_000
    # the gates' scans answered in the upload's middle (its first fifth is mostly the command
    # being read, before its first transaction) were published before it ended. (Measured: all
    # of them, ~0.1 s after their answers; as two transactions, 20 of 24, 32 of 44 and 44 of 44
    # were published after the upload.)
    span = ended - began
    meanwhile = [str(d.scan_id) for _, at, _, d in calls if began + 0.2 * span <= at <= began + 0.6 * span]
    # (at least 4, as before this test read another tenant's gates: it sees 144-192 now)
    assert len(meanwhile) >= 4, (f"{len(meanwhile)} gate scans answered between 20% and 60% of a "
                                 f"{span:.2f}-s upload ({len(calls)} in all)")
    late = [scan_id for scan_id in meanwhile if published.get(scan_id, float("inf")) > ended]
    assert not late, (f"{len(late)} of {len(meanwhile)} events of scans answered meanwhile "
                      f"were published after the {span:.2f}-s upload")


async def test_an_uploads_admissions_reach_redis_and_a_moved_one_is_overwritten(venue_factory, redis_url):
    """Tier 2 (Redis) hears of an upload's admissions once its parts are decided (the handler
    hands them over after the last part): new ones claimed, one the upload moved to an earlier
    offline scan overwritten. The unit test fakes Redis; this is the real one."""
    v = await venue_factory(tickets=3)
    moved, fresh, unscanned = v.tickets
    r = aioredis.from_url(redis_url, decode_responses=True)

    async def known(code: str, gate: str) -> bool:
        admission = decode_admission(await r.get(claim_key(v.org, code)))
        return admission is not None and admission.first_gate == gate

    async def until(code: str, gate: str) -> None:
        async with asyncio.timeout(10):
            while not await known(code, gate):
                await asyncio.sleep(0.05)

    try:
        assert (await v.scan(moved, gate="Online")).result == "accepted"
        await until(moved, "Online")
        t0 = datetime.now(UTC) - timedelta(minutes=30)  # before the online admission
        results = await v.sync([_scan(v, moved, t0, gate="North"), _scan(v, fresh, t0, gate="North")])
        assert [res["result"] for res in results] == ["accepted", "accepted"]
        await until(moved, "North")
        await until(fresh, "North")
        assert await r.get(claim_key(v.org, unscanned)) is None
    finally:
        await r.aclose()
