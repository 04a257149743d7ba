"""An event the audit log cannot record goes to the dead-letter stream with its reason, and the
events around it are recorded."""

from __future__ import annotations

import asyncio
import uuid

from nats.js.api import ConsumerConfig, DeliverPolicy

from libs.jetstream import DLQ_REASON_HEADER, DLQ_SUBJECT_HEADER
from libs.subjects import DEAD_LETTER_STREAM, dead_letter
from services.audit.bootstrap import DURABLE, build


async def test_poison_events_are_dead_lettered_with_reason_and_the_rest_recorded(start_service, bench):
    org = uuid.uuid4()
    dlq = await bench.js.pull_subscribe(
        dead_letter(DURABLE), stream=DEAD_LETTER_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    try:
        first, last = bench.sample_event(org, 1), bench.sample_event(org, 2)
        bad_type = bench.sample_event(org, 3, type_="NotAType")
        nan = bench.sample_event(org, 4)
        nan_bytes = nan.to_bytes().replace(b'"n":4', b'"n":NaN')
        assert nan_bytes != nan.to_bytes()

        # all in the stream before the service starts, so they arrive in one batch: the batch
        # path must isolate the poison and still record the good events around it
        await bench.publish([first])
        await bench.js.publish(f"vge.evt.{org}.test.garbage.sent", b"{not an envelope")
        await bench.publish([bad_type])
        await bench.js.publish(f"vge.evt.{org}.test.scan.accepted", nan_bytes,
                               headers={"Nats-Msg-Id": str(nan.event_id)})
        await bench.publish([last])
        await start_service(build)

        stats = await bench.wait_for_records(org, 2)
        assert await bench.event_ids(org) == [first.event_id, last.event_id]

        reasons: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(reasons) < 3:
            assert loop.time() < deadline, f"dead letters so far: {reasons}"
            try:
                msgs = await dlq.fetch(10, timeout=1)
            except TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
                if str(org) in msg.headers.get(DLQ_SUBJECT_HEADER, ""):
                    reasons[msg.headers[DLQ_SUBJECT_HEADER].split(".", 3)[3]] = msg.headers[DLQ_REASON_HEADER]
        # keyed by the original subject's tail: <service>.<entity>.<verb>
        assert reasons["test.garbage.sent"].startswith("malformed envelope")
        assert reasons["test.NotAType"].startswith("handler refused: InvalidInput: event type 'NotAType'")
        assert reasons["test.scan.accepted"].startswith(
            "handler refused: InvalidInput: event data cannot be recorded"
        )

        stats = await bench.stats(org)
        assert (stats.count, stats.max_seq, stats.head_seq) == (2, 2, 2)
        assert (await bench.verify(org))["ok"] is True
        # and the consumer goes on
        after = bench.sample_event(org, 5)
        await bench.publish([after])
        await bench.wait_for_records(org, 3)
        assert (await bench.event_ids(org))[-1] == after.event_id
    finally:
        await dlq.unsubscribe()
