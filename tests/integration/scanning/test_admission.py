"""Admission rules at the gate: the state machine, re-entry, and the fixed reason vocabulary."""

from __future__ import annotations

import uuid
from datetime import timedelta




async def test_first_entry_accepted_then_already_admitted_with_first_gate(venue_factory):
    v = await venue_factory(tickets=1)
    code = v.tickets[0]
    first = await v.scan(code, gate="North", nonce="n1")
    assert (first.result, first.reason, first.ticket_type) == ("accepted", None, "GA")
    second = await v.scan(code, dev=2, gate="South")
    assert (second.result, second.reason) == ("rejected", "already_admitted")
    assert second.first_gate == "North" and second.first_admitted_at == first.first_admitted_at
    assert second.scan_id != first.scan_id
    # the admitting device's retry gets its first decision back, recorded once
    retry = await v.scan(code, gate="North", nonce="n1")
    assert (retry.result, retry.scan_id, retry.replayed) == ("accepted", first.scan_id, True)


async def test_reentry_allowed_and_not(venue_factory):
    no = await venue_factory(tickets=1, reentry=False)
    yes = await venue_factory(tickets=1, reentry=True)
    for v, expected in ((no, ("rejected", "already_admitted")), (yes, ("accepted", None))):
        code = v.tickets[0]
        assert (await v.scan(code)).result == "accepted"
        assert (await v.scan(code, direction="exit")).result == "accepted"
        again = await v.scan(code)
        assert (again.result, again.reason) == expected
    # inside is inside, re-entry or not
    inside = await yes.scan(yes.tickets[0])
    assert (inside.result, inside.reason) == ("rejected", "already_admitted")


async def test_exit_without_entry_is_not_inside(venue_factory):
    v = await venue_factory(tickets=1)
    d = await v.scan(v.tickets[0], direction="exit")
    assert (d.result, d.reason) == ("rejected", "not_inside")


async def test_cancelled_wrong_event_unknown_and_device_binding(venue_factory):
    v = await venue_factory(tickets=3)
    await v.cancel(v.tickets[0])
    assert (await v.scan(v.tickets[0])).reason == "cancelled"
    assert (await v.scan(v.tickets[1], event_id=uuid.uuid4())).reason == "wrong_event"
    assert (await v.scan("TKT-does-not-exist")).reason == "unknown_ticket"
    d = await v.scan(v.tickets[2], device_event_id=str(uuid.uuid4()))
    assert d.reason == "device_not_allowed"
    assert (await v.scan(v.tickets[2], device_event_id=str(v.event_id))).result == "accepted"


async def test_outside_validity_window_and_zones(venue_factory):
    later = await venue_factory(tickets=1, starts_in=timedelta(days=3))
    assert (await later.scan(later.tickets[0])).reason == "not_valid_now"
    zoned = await venue_factory(tickets=2, zones={"VIP": ["vip-lounge"], "GA": []})
    vip, ga = zoned.tickets  # tickets alternate over the types: VIP, GA
    assert (await zoned.scan(ga, zone="vip-lounge")).result == "accepted"  # GA: every zone
    assert (await zoned.scan(vip, zone="field")).reason == "zone_denied"
    assert (await zoned.scan(vip, zone="vip-lounge")).result == "accepted"


async def test_another_tenants_ticket_is_unknown(venue_factory):
    a = await venue_factory(tickets=1)
    b = await venue_factory(tickets=1)
    leak = await b.scan(a.tickets[0], event_id=a.event_id)
    assert (leak.result, leak.reason, leak.ticket_type, leak.first_gate) == ("rejected", "unknown_ticket", None, None)
    assert (await a.scan(a.tickets[0])).result == "accepted"


async def test_occupancy_follows_entries_and_exits(venue_factory):
    v = await venue_factory(tickets=3, reentry=True)
    for code in v.tickets:
        await v.scan(code, gate="A")
    await v.scan(v.tickets[0], direction="exit", gate="B")
    occ = await v.occupancy()
    assert (occ["inside"], occ["entries"], occ["exits"], occ["capacity"]) == (2, 3, 1, 1000)
    gates = {g["key"]: (g["entries"], g["exits"]) for g in occ["by_gate"]}
    assert gates == {"A": (3, 0), "B": (0, 1)}
    assert occ["by_ticket_type"] == [{"key": "GA", "entries": 3, "exits": 1, "inside": 2}]


async def test_unsigned_scan_is_refused(venue_factory, nc):
    import json

    v = await venue_factory(tickets=1)
    reply = await nc.request("vge.cmd.scanning.scan", json.dumps(
        {"event_id": str(v.event_id), "ticket_code": v.tickets[0]}).encode(), timeout=2)
    assert json.loads(reply.data)["error"] == "unauthenticated"
    assert (await v.scan(v.tickets[0])).result == "accepted"  # nothing was admitted by it
