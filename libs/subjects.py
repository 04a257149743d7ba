"""NATS subject names: commands, events, dead letters (design §3)."""

from __future__ import annotations

from uuid import UUID

__all__ = [
    "EVENTS_STREAM",
    "EVENTS_SUBJECTS",
    "DEAD_LETTER_STREAM",
    "DEAD_LETTER_SUBJECTS",
    "command",
    "event",
    "dead_letter",
    "command_queue",
]

EVENTS_STREAM = "VGE_EVENTS"
EVENTS_SUBJECTS = "vge.evt.>"
DEAD_LETTER_STREAM = "VGE_DEAD_LETTERS"
DEAD_LETTER_SUBJECTS = "vge.dlq.>"


def command(service: str, name: str) -> str:
    """``vge.cmd.<service>.<command>`` (core request/reply)."""
    return f"vge.cmd.{service}.{name}"


def command_queue(service: str) -> str:
    """The queue group replicas of one service share."""
    return f"vge-{service}"


def event(org_id: UUID | str, service: str, event_type: str) -> str:
    """``vge.evt.<org_id>.<service>.<entity>.<verb>``; ``event_type`` is ``<entity>.<verb>``
    as in the envelope's ``type`` (e.g. ``scan.accepted``)."""
    return f"vge.evt.{org_id}.{service}.{event_type}"


def dead_letter(consumer: str) -> str:
    """Where a consumer parks a message it gave up on."""
    return f"vge.dlq.{consumer}"
