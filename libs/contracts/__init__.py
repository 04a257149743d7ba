"""Every command, reply and event payload of the platform, as pydantic models.

Defined once here so producers and consumers share one shape and every service's AsyncAPI comes
from the same models. Commands are named as imperatives (``AdmitTicket``), events in the past
tense (``TicketAdmitted``). An event model is the envelope's ``data``; ``EventData.envelope``
wraps it and ``EventData.from_envelope`` reads it back.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from libs.actor import Actor
from libs.envelope import Envelope

__all__ = ["Command", "Reply", "EventData"]


class Command(BaseModel):
    """Base of command payloads: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Reply(BaseModel):
    """Base of command replies."""


class EventData(BaseModel):
    """Base of event payloads. Subclasses set ``event_type`` (``<entity>.<verb>``) and the
    ``service`` that owns (and alone publishes) the event."""

    event_type: ClassVar[str]
    service: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def envelope(
        self,
        org_id: UUID,
        actor: Actor,
        correlation_id: str,
        causation_id: str | None = None,
        **fields: Any,
    ) -> Envelope:
        """This payload in an envelope, ready for the outbox."""
        return Envelope(
            type=self.event_type,
            schema_version=self.schema_version,
            org_id=org_id,
            actor=actor,
            correlation_id=correlation_id,
            causation_id=causation_id,
            data=self.model_dump(mode="json"),
            **fields,
        )

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> Self:
        """The typed payload of ``envelope``; raises ``ValueError`` for another event type."""
        if envelope.type != cls.event_type:
            raise ValueError(f"{envelope.type} is not {cls.event_type}")
        return cls.model_validate(envelope.data)
