"""The outbox relay counts JetStream's answers per pass: an answer to an earlier, failed pass
never completes a later one, and a refusal fails the pass. (The NATS client is a fake: this is
the counting alone; tests/integration/test_outbox.py runs it against a real server.)"""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from libs.outbox import OutboxRelay, PublishRefused

STORED = b'{"stream":"VGE_EVENTS","seq":1}'


class FakeNats:
    """Records what the relay publishes and hands it the answers the test delivers."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.answer: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.relay"

    async def subscribe(self, subject: str, cb: Any) -> "FakeNats":
        assert subject == "_INBOX.relay.*"
        self.answer = cb
        return self

    async def publish(self, subject: str, payload: bytes, reply: str, headers: dict[str, str]) -> None:
        assert headers["Nats-Msg-Id"]
        self.replies.append(reply)

    async def unsubscribe(self) -> None:
        pass


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"subject": "vge.evt.x", "payload": b"{}", "event_id": uuid.uuid4()} for _ in range(n)]


async def _answer(nats: FakeNats, reply: str, data: bytes = STORED, headers: Any = None) -> None:
    await nats.answer(SimpleNamespace(subject=reply, data=data, headers=headers))


async def _published(nats: FakeNats, count: int) -> None:
    while len(nats.replies) < count:
        await asyncio.sleep(0)


async def test_a_pass_ends_when_every_event_of_it_is_confirmed_and_not_before() -> None:
    nats = FakeNats()
    relay = OutboxRelay(None, nats, "scanning", publish_timeout=5.0)  # type: ignore[arg-type]
    confirming = asyncio.create_task(relay._publish_and_confirm(_rows(3)))
    await _published(nats, 3)
    assert len(set(nats.replies)) == 1  # one reply subject for the whole pass
    for _ in range(2):
        await _answer(nats, nats.replies[0])
    await asyncio.sleep(0.01)
    assert not confirming.done()
    await _answer(nats, nats.replies[0])
    await asyncio.wait_for(confirming, 1.0)


async def test_answers_to_an_earlier_failed_pass_do_not_count_for_the_next() -> None:
    nats = FakeNats()
    relay = OutboxRelay(None, nats, "scanning", publish_timeout=0.05)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError, match="2 of 2"):
        await relay._publish_and_confirm(_rows(2))  # nobody answers in time
    relay._publish_timeout = 5.0
    confirming = asyncio.create_task(relay._publish_and_confirm(_rows(2)))
    await _published(nats, 4)
    earlier, current = nats.replies[0], nats.replies[-1]
    assert earlier != current
    for _ in range(2):  # the first pass's answers arrive late
        await _answer(nats, earlier)
    await _answer(nats, current)
    await asyncio.sleep(0.01)
    assert not confirming.done()
    await _answer(nats, current)
    await asyncio.wait_for(confirming, 1.0)


@pytest.mark.parametrize(("data", "headers"), [
    (b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}', None),
    (b"", {"Status": "503"}),  # no stream takes the subject: no responders
    (b"not json", None),
])
async def test_a_refusal_fails_the_pass(data: bytes, headers: Any) -> None:
    nats = FakeNats()
    relay = OutboxRelay(None, nats, "scanning", publish_timeout=5.0)  # type: ignore[arg-type]
    confirming = asyncio.create_task(relay._publish_and_confirm(_rows(2)))
    await _published(nats, 2)
    await _answer(nats, nats.replies[0])
    await _answer(nats, nats.replies[0], data, headers)
    with pytest.raises(PublishRefused):
        await asyncio.wait_for(confirming, 1.0)
