"""The batch mode of ``libs.jetstream.EventConsumer`` the audit service consumes with: one call
for the whole batch, and when it fails, each message alone so the poison one is isolated.

Fakes stand in for JetStream messages here; the real server is in tests/integration/audit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence
from uuid import uuid4

import pytest

from libs.actor import Actor
from libs.envelope import Envelope
from libs.errors import InvalidInput
from libs.jetstream import DLQ_REASON_HEADER, EventConsumer

pytestmark = pytest.mark.unit

ORG = uuid4()


@dataclass
class FakeMsg:
    data: bytes
    deliveries: int = 1
    outcome: list[tuple[str, float | None]] = field(default_factory=list)
    subject: str = f"vge.evt.{ORG}.test.thing.done"

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(num_delivered=self.deliveries, sequence=SimpleNamespace(stream=id(self)))

    async def ack(self) -> None:
        self.outcome.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.outcome.append(("nak", delay))

    async def term(self) -> None:
        self.outcome.append(("term", None))


class FakeJetStream:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        self.published.append((subject, payload, headers))


def msg(n: int, deliveries: int = 1, **data: object) -> FakeMsg:
    env = Envelope(type="thing.done", org_id=ORG, actor=Actor.system("t", ORG),
                   correlation_id=f"c{n}", data={"n": n, **data})
    return FakeMsg(env.to_bytes(), deliveries)


class Recorder:
    """Batch and single handlers that fail on events marked ``poison``."""

    def __init__(self, error: type[Exception] = RuntimeError) -> None:
        self.batches: list[list[int]] = []
        self.singles: list[int] = []
        self.error = error

    async def batch(self, envelopes: Sequence[Envelope]) -> None:
        self.batches.append([e.data["n"] for e in envelopes])
        if any(e.data.get("poison") for e in envelopes):
            raise self.error("poison in the batch")

    async def single(self, envelope: Envelope) -> None:
        if envelope.data.get("poison"):
            raise self.error("poison")
        self.singles.append(envelope.data["n"])


def consumer(js: FakeJetStream, rec: Recorder, **kw: object) -> EventConsumer:
    return EventConsumer(js, durable="audit", handler=rec.single, batch_handler=rec.batch,  # type: ignore[arg-type]
                         max_deliver=3, backoff=[0.1, 0.5], **kw)


async def test_a_good_batch_is_one_call_and_every_message_acked() -> None:
    js, rec = FakeJetStream(), Recorder()
    msgs = [msg(n) for n in range(5)]
    await consumer(js, rec).handle_batch(msgs)  # type: ignore[arg-type]
    assert rec.batches == [[0, 1, 2, 3, 4]] and rec.singles == []
    assert [m.outcome for m in msgs] == [[("ack", None)]] * 5
    assert js.published == []


async def test_a_failing_batch_is_retried_message_by_message() -> None:
    js, rec = FakeJetStream(), Recorder()
    msgs = [msg(0), msg(1, poison=True), msg(2)]
    await consumer(js, rec).handle_batch(msgs)  # type: ignore[arg-type]
    assert rec.batches == [[0, 1, 2]] and rec.singles == [0, 2]
    assert msgs[0].outcome == [("ack", None)] and msgs[2].outcome == [("ack", None)]
    assert msgs[1].outcome == [("nak", 0.1)]  # retried later with backoff, not yet given up
    assert js.published == []


async def test_the_last_try_of_a_poison_message_is_dead_lettered() -> None:
    js, rec = FakeJetStream(), Recorder()
    poison = msg(1, deliveries=3, poison=True)
    await consumer(js, rec).handle_batch([msg(0), poison])  # type: ignore[arg-type]
    assert poison.outcome == [("term", None)]
    (subject, payload, headers), = js.published
    assert subject == "vge.dlq.audit" and payload == poison.data
    assert headers[DLQ_REASON_HEADER].startswith("handler failed: RuntimeError: poison")


async def test_permanent_errors_are_dead_lettered_at_the_first_failure() -> None:
    js, rec = FakeJetStream(), Recorder(error=InvalidInput)
    poison = msg(1, poison=True)
    await consumer(js, rec, permanent_errors=(InvalidInput,)).handle_batch([msg(0), poison])  # type: ignore[arg-type]
    assert poison.outcome == [("term", None)]
    assert js.published[0][2][DLQ_REASON_HEADER].startswith("handler refused: InvalidInput: poison")
    assert rec.singles == [0]


async def test_malformed_and_exhausted_messages_never_reach_the_batch() -> None:
    js, rec = FakeJetStream(), Recorder()
    garbage, exhausted, good = FakeMsg(b"{nope"), msg(1, deliveries=4), msg(2)
    await consumer(js, rec).handle_batch([garbage, exhausted, good])  # type: ignore[arg-type]
    assert rec.batches == [[2]]
    assert garbage.outcome == exhausted.outcome == [("term", None)]
    reasons = sorted(h[DLQ_REASON_HEADER] for _, _, h in js.published)
    assert reasons[0].startswith("gave up") and reasons[1].startswith("malformed envelope")
    assert good.outcome == [("ack", None)]


async def test_without_a_batch_handler_nothing_changes() -> None:
    """The per-message path keeps its behaviour (also with ``permanent_errors`` unset)."""
    js, rec = FakeJetStream(), Recorder(error=InvalidInput)
    consumer_ = EventConsumer(js, durable="x", handler=rec.single, max_deliver=3, backoff=[0.1])  # type: ignore[arg-type]
    poison = msg(1, poison=True)
    await consumer_.handle(poison)  # type: ignore[arg-type]
    assert poison.outcome == [("nak", 0.1)] and js.published == []


class FakeSubscription:
    """Hands out prepared batches, then times out like an idle pull (stands in for PullBatches)."""

    def __init__(self, batches: list[list[FakeMsg]]) -> None:
        self.batches = batches

    async def fetch(self, batch: int, timeout: float) -> list[FakeMsg]:
        if self.batches:
            return self.batches.pop(0)
        await asyncio.sleep(min(timeout, 0.05))
        raise TimeoutError

    async def stop(self) -> None:
        pass


async def test_batches_in_flight_are_bounded_and_finish_when_stopped() -> None:
    active, most, gate = 0, 0, asyncio.Event()
    seen: list[list[int]] = []

    async def slow_batch(envelopes: Sequence[Envelope]) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        seen.append([e.data["n"] for e in envelopes])
        await gate.wait()
        active -= 1

    batches = [[msg(3 * b + i) for i in range(3)] for b in range(3)]
    c = EventConsumer(FakeJetStream(), durable="audit", handler=Recorder().single,  # type: ignore[arg-type]
                      batch_handler=slow_batch, concurrency=2)
    c._pull = FakeSubscription([list(b) for b in batches])  # type: ignore[assignment]
    c._task = asyncio.create_task(c._run())
    for _ in range(100):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert (len(seen), active) == (2, 2)  # two in flight, the third waits for a slot
    stopping = asyncio.create_task(c.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # stop waits for the batches in flight...
    gate.set()
    await stopping
    assert most == 2
    # ...which finish and are acked; the third was never fetched (JetStream keeps it)
    assert [m.outcome for b in batches[:2] for m in b] == [[("ack", None)]] * 6
    assert len(seen) == 2 and all(m.outcome == [] for m in batches[2])
