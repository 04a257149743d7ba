"""``libs.jetstream.PullBatches``, the batch pull the audit consumer runs on, against a real
JetStream: bounded batches, live messages after idle periods, and nothing stranded on stop."""

from __future__ import annotations

import asyncio
import time
import uuid

from nats.js.api import AckPolicy, ConsumerConfig

from libs.jetstream import PullBatches
from libs.subjects import EVENTS_STREAM


async def _consumer(js, org: uuid.UUID, ack_wait: float = 30.0) -> str:
    durable = f"pull_{uuid.uuid4().hex[:10]}"
    await js.add_consumer(EVENTS_STREAM, ConsumerConfig(
        durable_name=durable, name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait,
        max_deliver=-1, filter_subject=f"vge.evt.{org}.>",
    ))
    return durable


async def _publish(js, org: uuid.UUID, n: int) -> None:
    await asyncio.gather(*(js.publish(f"vge.evt.{org}.test.thing.done", str(i).encode()) for i in range(n)))


async def test_batches_are_bounded_and_live_messages_come_after_idle_periods(bench):
    js, org = bench.js, uuid.uuid4()
    durable = await _consumer(js, org)
    pull = PullBatches(js, EVENTS_STREAM, durable)
    await pull.start()
    try:
        await _publish(js, org, 25)
        got: list[bytes] = []
        while len(got) < 25:
            batch = await pull.fetch(10, timeout=2)
            assert 1 <= len(batch) <= 10
            got += [m.data for m in batch]
            for m in batch:
                await m.ack()
        assert sorted(got, key=int) == [str(i).encode() for i in range(25)]

        # nothing to fetch: a timeout, not an empty batch
        started = time.monotonic()
        try:
            await pull.fetch(10, timeout=0.3)
            raise AssertionError("an idle pull returned messages")
        except TimeoutError:
            pass
        assert time.monotonic() - started < 1.5
        # after the open request expired (server status 408), a new one picks up live messages
        await asyncio.sleep(1.2)
        started = time.monotonic()
        await _publish(js, org, 1)
        batch = await pull.fetch(10, timeout=3)
        assert [m.data for m in batch] == [b"0"]
        assert time.monotonic() - started < 0.5
        await batch[0].ack()
    finally:
        await pull.stop()


async def test_stop_gives_back_what_was_received_but_not_handed_out(bench):
    js, org = bench.js, uuid.uuid4()
    durable = await _consumer(js, org, ack_wait=30.0)
    first = PullBatches(js, EVENTS_STREAM, durable)
    await first.start()
    await _publish(js, org, 2)
    for m in await first.fetch(8, timeout=2):  # the request for 8 stays open after these 2
        await m.ack()
    await _publish(js, org, 3)  # delivered into the open request: received, not handed out

    async def delivered_not_acked() -> bool:
        return (await js.consumer_info(EVENTS_STREAM, durable)).num_ack_pending == 3

    await bench.eventually(delivered_not_acked, timeout=5, what="3 messages buffered")
    await first.stop()  # nak'ed now, not left to the 30 s ack wait

    second = PullBatches(js, EVENTS_STREAM, durable)
    await second.start()
    try:
        started, batch = time.monotonic(), []
        while len(batch) < 3:
            batch += await second.fetch(8, timeout=5)
        assert time.monotonic() - started < 2
        assert sorted(m.data for m in batch) == [b"0", b"1", b"2"]
        assert {m.metadata.num_delivered for m in batch} == {2}
        for m in batch:
            await m.ack()
    finally:
        await second.stop()
