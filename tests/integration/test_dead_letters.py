"""Dead letters for operators (``libs.dead_letters``, ``vge dlq``): a parked event is listed with
why it was parked, replayed once its cause is fixed (applied once, also by the consumers that had
it already), or discarded."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest

from libs.actor import Actor
from libs.db import mark_processed, tenant_transaction
from libs.dead_letters import NoSuchDeadLetter, dead_letters, discard, replay
from libs.envelope import Envelope
from libs.jetstream import EventConsumer, ensure_streams

ROOT = Path(__file__).resolve().parents[2]
APPLIED = """
CREATE TABLE applied (
    organization_id uuid NOT NULL,
    consumer text NOT NULL,
    event_id uuid NOT NULL
);
SELECT vge.enable_tenant_rls('applied');
"""


@pytest.fixture
async def pool(schema_pool):
    return await schema_pool(APPLIED)


class Applier:
    """An idempotent consumer's handler (it records the event ids it applied), which refuses
    every event while ``broken``; ``deliveries`` counts what reached it."""

    def __init__(self, pool, name: str, *, broken: bool = False) -> None:
        self.pool, self.name, self.broken = pool, name, broken
        self.deliveries: list[uuid.UUID] = []

    async def __call__(self, env: Envelope) -> None:
        self.deliveries.append(env.event_id)
        if self.broken:
            raise RuntimeError("the registry cannot apply this yet")
        async with tenant_transaction(self.pool, env.org_id) as conn:
            if await mark_processed(conn, self.name, env.event_id):
                await conn.execute("INSERT INTO applied VALUES ($1, $2, $3)", env.org_id, self.name, env.event_id)

    async def applied(self, org: uuid.UUID) -> list[uuid.UUID]:
        async with tenant_transaction(self.pool, org) as conn:
            return [r["event_id"] for r in await conn.fetch(
                "SELECT event_id FROM applied WHERE consumer = $1", self.name)]


async def _parked(js, durable: str, n: int, eventually) -> list:
    letters: list = []

    async def enough() -> bool:
        letters[:] = [d async for d in dead_letters(js, durable)]
        return len(letters) >= n

    await eventually(enough)
    return letters


def _ticket_issued(org: uuid.UUID) -> Envelope:
    return Envelope(type="ticket.issued", org_id=org, actor=Actor.system("payments", org),
                    correlation_id=f"corr-{uuid.uuid4()}", data={"ticket_code": "T-1"})


async def _start(js, durable: str, org: uuid.UUID, handler) -> EventConsumer:
    consumer = EventConsumer(js, durable=durable, handler=handler, filter_subject=f"vge.evt.{org}.>",
                             max_deliver=2, backoff=[0.05])
    await consumer.start()
    return consumer


async def test_a_replayed_dead_letter_is_applied_once_and_leaves_the_dead_letter_stream(pool, nc, schema, eventually):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    registry = Applier(pool, "registry", broken=True)
    audit = Applier(pool, "audit")  # another consumer of the same events, which had no trouble
    consumers = [await _start(js, f"{schema}_registry", org, registry),
                 await _start(js, f"{schema}_audit", org, audit)]
    try:
        event = _ticket_issued(org)
        subject = f"vge.evt.{org}.payments.ticket.issued"
        await js.publish(subject, event.to_bytes(), headers={"Nats-Msg-Id": str(event.event_id)})
        [letter] = await _parked(js, f"{schema}_registry", 1, eventually)
        assert letter.summary() == {
            "seq": letter.seq, "consumer": f"{schema}_registry", "subject": subject,
            "reason": "handler failed: RuntimeError: the registry cannot apply this yet", "deliveries": 2,
            "parked_at": letter.parked_at.isoformat(), "envelope": True, "event_id": str(event.event_id),
            "type": "ticket.issued", "org_id": str(org), "correlation_id": event.correlation_id,
        }
        assert await registry.applied(org) == []
        await eventually(lambda: _equals(audit.applied(org), [event.event_id]))

        registry.broken = False  # the cause is fixed
        replayed = await replay(js, letter.seq)
        assert replayed.seq == letter.seq
        await eventually(lambda: _equals(registry.applied(org), [event.event_id]))
        await eventually(lambda: _true(audit.deliveries.count(event.event_id) == 2))  # it came again
        assert await audit.applied(org) == [event.event_id]  # and was skipped
        assert [d async for d in dead_letters(js, f"{schema}_registry")] == []

        with pytest.raises(NoSuchDeadLetter):  # replayed already: never twice
            await replay(js, letter.seq)
        await asyncio.sleep(0.3)
        assert registry.deliveries.count(event.event_id) == 3  # two failed tries, one replay
    finally:
        for consumer in consumers:
            await consumer.stop()


async def test_a_malformed_message_is_listed_as_such_and_can_be_discarded(nc, schema, eventually):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    durable = f"{schema}_registry"
    consumer = await _start(js, durable, org, Applier(None, "registry"))
    try:
        await js.publish(f"vge.evt.{org}.payments.garbage", b"{not an envelope")
        [letter] = await _parked(js, durable, 1, eventually)
        summary = letter.summary()
        assert summary["envelope"] is False and "event_id" not in summary
        assert summary["reason"].startswith("malformed envelope")
        assert (await discard(js, letter.seq)).seq == letter.seq
        assert [d async for d in dead_letters(js, durable)] == []
        with pytest.raises(NoSuchDeadLetter):
            await discard(js, letter.seq)
    finally:
        await consumer.stop()


async def test_vge_dlq_lists_and_replays_a_consumers_dead_letters(pool, nc, nats_url, schema, eventually):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    durable = f"{schema}_registry"
    registry = Applier(pool, "registry", broken=True)
    consumer = await _start(js, durable, org, registry)
    try:
        events = [_ticket_issued(org), _ticket_issued(org)]
        for event in events:
            await js.publish(f"vge.evt.{org}.payments.ticket.issued", event.to_bytes(),
                             headers={"Nats-Msg-Id": str(event.event_id)})
        await _parked(js, durable, 2, eventually)

        code, out, err = await _vge("dlq", "list", "--consumer", durable, nats_url=nats_url)
        assert code == 0, err
        listed = [json.loads(line) for line in out.splitlines()]
        assert [row["event_id"] for row in listed] == [str(e.event_id) for e in events]

        code, out, err = await _vge("dlq", "list", "--consumer", durable, "--limit", "1", nats_url=nats_url)
        assert code == 0 and len(out.splitlines()) == 1 and "more" in err

        registry.broken = False
        first, second = listed[0]["seq"], listed[1]["seq"]
        # one that is not there (a typo): said, and the others are still replayed
        missing = second + 1_000_000
        code, out, err = await _vge("dlq", "replay", str(missing), str(first), nats_url=nats_url)
        assert code == 1 and f"no dead letter {missing}" in err
        assert [json.loads(line)["replayed"] for line in out.splitlines()] == [first]
        await eventually(lambda: _equals(registry.applied(org), [events[0].event_id]))

        code, out, err = await _vge("dlq", "replay", "--consumer", durable, nats_url=nats_url)
        assert code == 0, err
        assert [json.loads(line)["replayed"] for line in out.splitlines()] == [second]
        await eventually(lambda: _equals(_sorted(registry.applied(org)), sorted(e.event_id for e in events)))
        assert [d async for d in dead_letters(js, durable)] == []
    finally:
        await consumer.stop()


async def _vge(*args: str, nats_url: str) -> tuple[int, str, str]:
    # the installed command's code, as an operator runs it, against the test's NATS
    env = {**os.environ, "VGE_NATS_URL": nats_url, "VGE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "libs.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def _equals(value, expected) -> bool:
    return await value == expected


async def _sorted(values):
    return sorted(await values)


async def _true(value: bool) -> bool:
    return value
