"""The consumer helper: redelivery is applied once, poison ends in the dead-letter stream with
its reason after the bounded retries, and the consumer keeps going."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import REGISTRY

from libs.actor import Actor
from libs.db import mark_processed, tenant_transaction
from libs.envelope import Envelope
from libs.jetstream import DLQ_REASON_HEADER, EventConsumer, ensure_streams
from libs.subjects import DEAD_LETTER_STREAM, dead_letter

APPLIED = """
CREATE TABLE applied (
    organization_id uuid NOT NULL,
    event_id uuid NOT NULL,
    n int NOT NULL
);
SELECT vge.enable_tenant_rls('applied');
"""


@pytest.fixture
async def pool(schema_pool):
    return await schema_pool(APPLIED)


def _event(org, n, **data) -> Envelope:
    return Envelope(type="sample.happened", org_id=org, actor=Actor.system("t", org),
                    correlation_id=f"c{n}", data={"n": n, **data})


async def _publish(js, env: Envelope, msg_id: str | None = None) -> None:
    await js.publish(f"vge.evt.{env.org_id}.test.{env.type}", env.to_bytes(),
                     headers={"Nats-Msg-Id": msg_id or str(env.event_id)})


async def _applied(pool, org) -> list[int]:
    async with tenant_transaction(pool, org) as conn:
        return [r["n"] for r in await conn.fetch("SELECT n FROM applied ORDER BY n")]


async def test_redelivered_event_is_applied_once(pool, nc, schema, eventually):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    deliveries: list[int] = []
    crashed: set[uuid.UUID] = set()

    async def handler(env: Envelope) -> None:
        deliveries.append(env.data["n"])
        async with tenant_transaction(pool, env.org_id) as conn:
            if await mark_processed(conn, "applier", env.event_id):
                await conn.execute("INSERT INTO applied VALUES ($1, $2, $3)", env.org_id, env.event_id, env.data["n"])
        if env.event_id not in crashed:
            crashed.add(env.event_id)  # committed, then "crashed" before the ack
            raise RuntimeError("lost the ack")

    consumer = EventConsumer(js, durable=f"{schema}_applier", handler=handler,
                             filter_subject=f"vge.evt.{org}.>", backoff=[0.05])
    await consumer.start()
    try:
        first, second = _event(org, 1), _event(org, 2)
        await _publish(js, first)
        await _publish(js, second)
        await _publish(js, first, msg_id=f"{first.event_id}-again")  # the bus delivers it twice
        await eventually(lambda: _count_at_least(deliveries, 5))
        await asyncio.sleep(0.3)
        assert await _applied(pool, org) == [1, 2]
    finally:
        await consumer.stop()


async def _count_at_least(items, n):
    return len(items) >= n


async def test_poison_event_is_dead_lettered_and_consumer_goes_on(pool, nc, schema, eventually):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    attempts: dict[int, int] = {}

    async def handler(env: Envelope) -> None:
        n = env.data["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if env.data.get("poison"):
            raise ValueError("cannot apply this one")
        async with tenant_transaction(pool, env.org_id) as conn:
            if await mark_processed(conn, "applier", env.event_id):
                await conn.execute("INSERT INTO applied VALUES ($1, $2, $3)", env.org_id, env.event_id, n)

    durable = f"{schema}_poison"
    consumer = EventConsumer(js, durable=durable, handler=handler, filter_subject=f"vge.evt.{org}.>",
                             max_deliver=3, backoff=[0.05, 0.1])
    dlq = await js.pull_subscribe(dead_letter(durable), stream=DEAD_LETTER_STREAM)
    await consumer.start()
    try:
        await _publish(js, _event(org, 1))
        await _publish(js, _event(org, 2, poison=True))
        await js.publish(f"vge.evt.{org}.test.garbage", b"{not an envelope")
        await _publish(js, _event(org, 3))

        async def done():
            return await _applied(pool, org) == [1, 3]

        await eventually(done)
        dead = []
        while len(dead) < 2:
            dead += await dlq.fetch(2, timeout=10)
        reasons = sorted(m.headers[DLQ_REASON_HEADER] for m in dead)
        assert reasons[0].startswith("handler failed: ValueError: cannot apply this one")
        assert reasons[1].startswith("malformed envelope")
        poison = next(m for m in dead if m.headers[DLQ_REASON_HEADER].startswith("handler"))
        assert Envelope.from_bytes(poison.data).data["n"] == 2  # the original message, intact
        assert poison.headers["Vge-Deliveries"] == "3"
        assert attempts[2] == 3  # bounded: exactly max_deliver tries
        await asyncio.sleep(0.5)
        assert attempts[2] == 3  # and no more after it was parked
    finally:
        await consumer.stop()
        await dlq.unsubscribe()


def _gauge(name: str, durable: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"consumer": durable})


async def test_a_consumers_backlog_is_in_its_gauges(nc, schema, eventually):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    durable = f"{schema}_lagging"
    go_on = asyncio.Event()

    async def handler(env: Envelope) -> None:
        await go_on.wait()  # (a handler stuck on a slow database, say)

    for n in range(5):
        await _publish(js, _event(org, n))
    consumer = EventConsumer(js, durable=durable, handler=handler, filter_subject=f"vge.evt.{org}.>",
                             lag_poll=0.05)
    await consumer.start()
    try:
        async def stuck() -> bool:  # fetched, not one acknowledged
            return _gauge("vge_consumer_ack_pending", durable) == 5

        await eventually(stuck, what="5 events fetched and not acknowledged")
        go_on.set()

        async def caught_up() -> bool:
            return (_gauge("vge_consumer_pending", durable), _gauge("vge_consumer_ack_pending", durable)) == (0, 0)

        await eventually(caught_up, what="the backlog gauges back at 0")
    finally:
        await consumer.stop()
