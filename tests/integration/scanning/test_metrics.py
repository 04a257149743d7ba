"""What operators watch at the gates: decisions counted by mode, result and reason, and offline
conflicts, on the service's Prometheus registry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY


def _decided(mode: str, result: str, reason: str = "") -> float:
    labels = {"mode": mode, "result": result, "reason": reason}
    return REGISTRY.get_sample_value("vge_scans_decided_total", labels) or 0.0


def _conflicts() -> float:
    return REGISTRY.get_sample_value("vge_scan_offline_conflicts_total") or 0.0


KEYS = [("online", "accepted", ""), ("online", "rejected", "already_admitted"),
        ("online", "rejected", "unknown_ticket"), ("offline", "accepted", ""),
        ("offline", "rejected", "already_admitted")]


def _snapshot() -> dict[tuple[str, ...], float]:
    return {**{k: _decided(*k) for k in KEYS}, ("conflicts",): _conflicts()}


def _offline(v, code, at, *, gate, nonce):
    return {"event_id": str(v.event_id), "ticket_code": code, "direction": "entry", "gate": gate,
            "nonce": nonce, "scanned_at": at.isoformat(), "device_result": "accepted"}


async def test_decisions_are_counted_by_mode_result_and_reason_and_retries_once(venue_factory):
    v = await venue_factory(tickets=4)
    before = _snapshot()
    assert (await v.scan(v.tickets[0], nonce="n1")).result == "accepted"
    assert (await v.scan(v.tickets[0], nonce="n1")).replayed  # a retry: not a new decision
    assert (await v.scan(v.tickets[0], dev=2)).reason == "already_admitted"
    assert (await v.scan(f"TKT-{uuid.uuid4().hex}")).reason == "unknown_ticket"

    t0 = datetime.now(UTC) - timedelta(minutes=10)
    # the same ticket admitted offline at two gates, in one upload: the later one is the conflict
    results = await v.sync([_offline(v, v.tickets[1], t0, gate="North", nonce="o1"),
                            _offline(v, v.tickets[1], t0 + timedelta(minutes=1), gate="South", nonce="o2")])
    assert [(r["result"], r["conflict"]) for r in results] == [("accepted", False), ("rejected", True)]
    # and uploaded later-first from two devices: the earlier one takes the admission's place
    await v.sync([_offline(v, v.tickets[2], t0 + timedelta(minutes=2), gate="South", nonce="o3")], dev=2)
    await v.sync([_offline(v, v.tickets[2], t0, gate="North", nonce="o4")], dev=3)

    after = _snapshot()
    assert {k: after[k] - before[k] for k in after} == {
        ("online", "accepted", ""): 1, ("online", "rejected", "already_admitted"): 1,
        ("online", "rejected", "unknown_ticket"): 1, ("offline", "accepted", ""): 3,
        ("offline", "rejected", "already_admitted"): 1, ("conflicts",): 2,
    }
