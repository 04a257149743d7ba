"""The audit service killed (SIGKILL) in the middle of a stream of events and started again, or
the NATS node leading its consumer killed: still exactly one record per event, no gaps, and the
chain verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import nats
import nats.errors

from libs.subjects import EVENTS_STREAM
from services.audit.bootstrap import DURABLE as AUDIT_DURABLE

N = 1500


async def test_killed_mid_stream_and_restarted_records_every_event_once(bench, service_process):
    org = uuid.uuid4()
    events = [bench.sample_event(org, n) for n in range(N)]
    audit = service_process("audit", VGE_LOG_LEVEL="WARNING")
    await audit.healthy()

    async def publish_steadily() -> None:
        for i in range(0, N, 30):
            await bench.publish(events[i : i + 30])
            await asyncio.sleep(0.02)

    publishing = asyncio.create_task(publish_steadily())

    async def some_recorded() -> bool:
        return (await bench.stats(org)).count >= 200

    await bench.eventually(some_recorded, timeout=30, what="200 records before the kill")
    audit.kill()  # no drain, no acks for what it holds
    at_kill = (await bench.stats(org)).count
    assert not publishing.done(), "the stream should still be flowing when the service dies"
    assert 0 < at_kill < N
    await publishing
    # a replayed copy of some events too, as a producer retry would send them
    last = await bench.publish(events[:100], msg_id_suffix="-retry")

    await service_process("audit", VGE_LOG_LEVEL="WARNING").healthy()
    # what the dead instance held comes back after the consumer's ack wait (5 s)
    await bench.wait_for_records(org, N, timeout=40)
    await bench.wait_consumed(last)
    stats = await bench.stats(org)
    assert (stats.count, stats.distinct_events) == (N, N)
    assert (stats.min_seq, stats.max_seq, stats.head_seq) == (1, N, N)
    assert set(await bench.event_ids(org)) == {e.event_id for e in events}
    verified = await bench.verify(org)
    assert (verified["ok"], verified["records_checked"]) == (True, N)


async def test_losing_the_nats_node_leading_its_consumer_loses_and_duplicates_no_record(
    nats_cluster, service_process, bench_via
):
    # a 3-node cluster (deploy/nats/nats-cluster.conf), the streams and the audit consumer on
    # three nodes; the node leading the consumer is killed while events flow
    audit = service_process("audit", **nats_cluster.service_env, VGE_LOG_LEVEL="WARNING")
    await audit.healthy()
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=nats_cluster.JS_TIMEOUT)
        bench = bench_via(nc, js)
        org = uuid.uuid4()
        n = 900
        events = [bench.sample_event(org, i) for i in range(n)]

        async def publish_steadily() -> int:
            last = 0
            for i in range(0, n, 30):
                while True:  # a producer retries (the same message ids) until JetStream has them
                    try:
                        last = await bench.publish(events[i : i + 30])
                        break
                    except nats.errors.Error:
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.02)
            return last

        publishing = asyncio.create_task(publish_steadily())

        async def some_recorded() -> bool:
            return (await bench.stats(org)).count >= 200

        await bench.eventually(some_recorded, timeout=30, what="200 records before the node is lost")
        lost = await nats_cluster.leader(js, EVENTS_STREAM, AUDIT_DURABLE)
        os.kill(lost.pid, signal.SIGKILL)
        at_loss = (await bench.stats(org)).count
        assert not publishing.done(), "events should still be flowing when the node is lost"
        assert 0 < at_loss < n
        last = await publishing

        await bench.wait_for_records(org, n, timeout=40)
        await bench.wait_consumed(last, timeout=40)
        stats = await bench.stats(org)
        assert (stats.count, stats.distinct_events) == (n, n)
        assert (stats.min_seq, stats.max_seq, stats.head_seq) == (1, n, n)
        assert (await nats_cluster.leader(js, EVENTS_STREAM, AUDIT_DURABLE)) is not lost
        verified = await bench.verify(org)
        assert (verified["ok"], verified["records_checked"]) == (True, n)
    finally:
        await nc.close()
