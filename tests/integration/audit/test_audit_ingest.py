"""Every event becomes exactly one audit record, chained per tenant: duplicates, redeliveries and
several audit instances at once change nothing."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime

import nats.aio.msg
from prometheus_client import REGISTRY

from libs.actor import Actor, ActorType
from libs.envelope import Envelope
from services.audit.adapters.postgres import PostgresAuditLog
from services.audit.bootstrap import build


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_each_event_is_one_record_even_when_delivered_again(start_service, bench):
    await start_service(build)
    org = uuid.uuid4()
    events = [bench.sample_event(org, n, payment_token="tok_ok") for n in range(300)]
    skipped_before = _metric("vge_audit_duplicates_skipped_total")

    await bench.publish(events)
    await bench.publish(events[:20])  # same Nats-Msg-Id: JetStream drops these
    last = await bench.publish(events[100:160], msg_id_suffix="-again")  # a producer retry
    await bench.wait_for_records(org, 300)
    await bench.wait_consumed(last)  # the copies too: nothing more can be appended

    stats = await bench.stats(org)
    assert (stats.count, stats.distinct_events) == (300, 300)
    assert (stats.min_seq, stats.max_seq, stats.head_seq) == (1, 300, 300)
    assert set(await bench.event_ids(org)) == {e.event_id for e in events}
    # the 60 copies did reach the service and were skipped, not lost in transit
    assert _metric("vge_audit_duplicates_skipped_total") - skipped_before >= 60

    verified = await bench.verify(org)
    assert verified == {
        "organization_id": str(org), "ok": True, "records_checked": 300, "last_seq": 300,
        "problem": None,
    }


async def test_a_record_keeps_actor_action_resource_change_and_correlation(start_service, bench):
    await start_service(build)
    org = uuid.uuid4()
    actor = Actor(user_id="key-7", organization_id=org, role=None, type=ActorType.API_KEY)
    env = Envelope(
        type="checkout.completed", org_id=org, actor=actor, correlation_id="req-42",
        causation_id="cmd-1", occurred_at=datetime.fromisoformat("2025-05-01T10:00:00.123456+02:00"),
        data={"checkout_id": "co-1", "event_id": str(uuid.uuid4()), "payment_token": "tok_ok",
              "customer": {"email": "a@b.c", "card_number": "4111"}, "total": 12050,
              "note": "naïve ✓ \u0000"},
    )
    await bench.publish([env])
    await bench.wait_for_records(org, 1)

    page = await bench.query(org)
    assert page["next"] is None and len(page["records"]) == 1
    record = page["records"][0]
    assert record["event_id"] == str(env.event_id) and record["seq"] == 1
    assert record["action"] == "checkout.completed"
    assert (record["resource_type"], record["resource_id"]) == ("checkout", "co-1")
    assert record["actor"] == {
        "user_id": "key-7", "organization_id": str(org), "role": None,
        "is_platform_admin": False, "is_platform_staff": False, "type": "api_key",
    }
    assert record["change"] == {"checkout_id": "co-1", "event_id": env.data["event_id"],
                                "customer": {"email": "a@b.c"}, "total": 12050,
                                "note": "naïve ✓ \u0000"}
    assert (record["correlation_id"], record["causation_id"]) == ("req-42", "cmd-1")
    assert datetime.fromisoformat(record["occurred_at"]) == env.occurred_at
    assert record["prev_hash"] == "0" * 64 and len(record["hash"]) == 64
    # the secret is nowhere in the stored row, not just absent from the reply
    raw = await bench.db.fetchval(
        "SELECT row_to_json(r)::text FROM audit.records r WHERE event_id = $1", env.event_id
    )
    assert "tok_ok" not in raw and "4111" not in raw and "co-1" in raw
    assert (await bench.verify(org))["ok"] is True


async def test_an_event_redelivered_after_a_lost_ack_is_recorded_once(start_service, bench, monkeypatch):
    """The audit commits, its ack is lost: JetStream delivers again (after the ack wait), and the
    second delivery is acknowledged without a second record."""
    org = uuid.uuid4()
    deliveries: Counter[str] = Counter()
    real_ack = nats.aio.msg.Msg.ack

    async def lossy_ack(msg: nats.aio.msg.Msg) -> None:
        if str(org) in msg.subject:
            deliveries[msg.subject + msg.header.get("Nats-Msg-Id", "")] += 1
            if msg.metadata.num_delivered == 1:
                return  # the ack of the first delivery never reaches the server
        await real_ack(msg)

    monkeypatch.setattr(nats.aio.msg.Msg, "ack", lossy_ack)
    await start_service(build)
    events = [bench.sample_event(org, n) for n in range(40)]
    await bench.publish(events)

    async def all_redelivered() -> bool:
        return len(deliveries) == 40 and all(n >= 2 for n in deliveries.values())

    await bench.eventually(all_redelivered, timeout=25, what="every event delivered twice")
    stats = await bench.stats(org)
    assert (stats.count, stats.distinct_events, stats.max_seq, stats.head_seq) == (40, 40, 40, 40)
    assert (await bench.verify(org))["ok"] is True


async def test_two_instances_append_one_contiguous_chain_per_tenant(start_service, bench, monkeypatch):
    orgs = [uuid.uuid4() for _ in range(3)]
    appended_by: Counter[int] = Counter()
    real_append = PostgresAuditLog.append

    async def counting_append(self, entries, recorded_at, **kw):
        records = await real_append(self, entries, recorded_at, **kw)
        if any(e.organization_id in orgs for e in entries):
            appended_by[id(self)] += 1
        return records

    monkeypatch.setattr(PostgresAuditLog, "append", counting_append)
    await start_service(build)
    await start_service(build)

    per_org = 400
    events = [bench.sample_event(org, n) for n in range(per_org) for org in orgs]
    last = 0
    for i in range(0, len(events), 300):  # in waves, so both instances keep pulling
        await bench.publish(events[i : i + 300])
        last = await bench.publish(events[i : i + 30], msg_id_suffix="-retry")
    for org in orgs:
        await bench.wait_for_records(org, per_org, timeout=30)
    await bench.wait_consumed(last)

    for org in orgs:
        stats = await bench.stats(org)
        assert (stats.count, stats.distinct_events) == (per_org, per_org), org
        assert (stats.min_seq, stats.max_seq, stats.head_seq) == (1, per_org, per_org), org
        verified = await bench.verify(org)
        assert (verified["ok"], verified["records_checked"]) == (True, per_org)
    assert len(appended_by) == 2, f"both instances should have appended: {appended_by}"
