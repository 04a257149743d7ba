"""The dead-letter stream, for operators: what was parked, and putting it back once the cause is
fixed (``vge dlq list | replay | discard``).

A consumer parks a message it gave up on in ``VGE_DEAD_LETTERS`` under ``vge.dlq.<durable>``,
with the reason, the original subject and the number of tries in headers
(``libs.jetstream.EventConsumer``). A ticket sold while scanning's registry could not apply it
stays unknown at the gates until that message is replayed, so parking it is only half the job.

Replaying publishes the original message again on its original subject, then deletes the dead
letter. Every consumer of that subject gets it again, not only the one that parked it: each
consumer records the event ids it applied (design §3), so the others skip it. Each replay
carries a message id of its own (``replay:VGE_DEAD_LETTERS:<seq>``), so a replay repeated after a
crash between the publish and the delete is dropped by JetStream's duplicate window, and
skipped by the consumers after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from pydantic import ValidationError

from libs.envelope import Envelope
from libs.jetstream import (
    DLQ_CONSUMER_HEADER,
    DLQ_DELIVERIES_HEADER,
    DLQ_REASON_HEADER,
    DLQ_SUBJECT_HEADER,
)
from libs.log import get_logger
from libs.subjects import DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS, dead_letter

__all__ = ["DeadLetter", "NoSuchDeadLetter", "dead_letters", "discard", "replay"]

log = get_logger(__name__)


class NoSuchDeadLetter(LookupError):
    """No dead letter has this sequence number (never, or replayed or discarded already)."""


@dataclass(frozen=True)
class DeadLetter:
    """One parked message: where it sits in the dead-letter stream and why it is there."""

    seq: int
    consumer: str
    subject: str
    reason: str
    deliveries: int
    parked_at: datetime | None
    data: bytes

    def summary(self) -> dict[str, Any]:
        """What an operator reads: the above, and the event's id, type and tenant if the message
        is an envelope at all (a malformed one is parked too)."""
        out: dict[str, Any] = {
            "seq": self.seq, "consumer": self.consumer, "subject": self.subject, "reason": self.reason,
            "deliveries": self.deliveries,
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
        }
        try:
            envelope = Envelope.from_bytes(self.data)
        except (ValidationError, ValueError):
            return {**out, "envelope": False}
        return {**out, "envelope": True, "event_id": str(envelope.event_id), "type": envelope.type,
                "org_id": str(envelope.org_id), "correlation_id": envelope.correlation_id}


def _dead_letter(msg: Any) -> DeadLetter:
    headers = msg.headers or {}
    return DeadLetter(
        seq=msg.seq, consumer=headers.get(DLQ_CONSUMER_HEADER, msg.subject.rsplit(".", 1)[-1]),
        subject=headers.get(DLQ_SUBJECT_HEADER, ""), reason=headers.get(DLQ_REASON_HEADER, ""),
        deliveries=int(headers.get(DLQ_DELIVERIES_HEADER, 0) or 0), parked_at=msg.time,
        data=msg.data or b"",
    )


async def dead_letters(js: JetStreamContext, consumer: str | None = None, *,
                       after: int = 0) -> AsyncIterator[DeadLetter]:
    """The dead letters (of one consumer, or all), oldest first, from sequence ``after + 1``.
    Read one by one with JetStream's get-message request: no consumer is created for reading."""
    subject = dead_letter(consumer) if consumer else DEAD_LETTER_SUBJECTS
    seq = after + 1
    while True:
        try:
            msg = await js.get_msg(DEAD_LETTER_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return
        yield _dead_letter(msg)
        seq = msg.seq + 1


async def _get(js: JetStreamContext, seq: int) -> DeadLetter:
    try:
        return _dead_letter(await js.get_msg(DEAD_LETTER_STREAM, seq=seq))
    except nats.js.errors.NotFoundError:
        raise NoSuchDeadLetter(f"no dead letter {seq}") from None


async def replay(js: JetStreamContext, seq: int) -> DeadLetter:
    """Publish dead letter ``seq`` again on its original subject, then delete it; returns it.
    Raises ``NoSuchDeadLetter`` if it is not (or no longer) there: nothing is published then."""
    letter = await _get(js, seq)
    if not letter.subject:
        raise NoSuchDeadLetter(f"dead letter {seq} does not say where it came from")
    await js.publish(letter.subject, letter.data,
                     headers={"Nats-Msg-Id": f"replay:{DEAD_LETTER_STREAM}:{seq}"})
    await js.delete_msg(DEAD_LETTER_STREAM, seq)
    log.info("dead_letter_replayed", seq=seq, consumer=letter.consumer, subject=letter.subject)
    return letter


async def discard(js: JetStreamContext, seq: int) -> DeadLetter:
    """Delete dead letter ``seq`` for good (a message that can never be applied); returns it."""
    letter = await _get(js, seq)
    await js.delete_msg(DEAD_LETTER_STREAM, seq)
    log.warning("dead_letter_discarded", seq=seq, consumer=letter.consumer, subject=letter.subject,
                reason=letter.reason)
    return letter
