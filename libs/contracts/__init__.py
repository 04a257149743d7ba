"""Every command, reply and event payload of the platform, as pydantic models.

Defined once here so producers and consumers share one shape and every service's AsyncAPI comes
from the same models. Commands are named as imperatives (``AdmitTicket``), events in the past
tense (``TicketAdmitted``). An event model is the envelope's ``data``; ``EventData.envelope``
wraps it and ``EventData.from_envelope`` reads it back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, Self
from uuid import UUID

from pydantic import BaseModel, ConfigDict, model_validator

from libs.actor import Actor
from libs.envelope import Envelope

__all__ = ["Command", "Reply", "EventData"]


def _without_nul(value: Any) -> None:
    """Refuse U+0000 anywhere in a command: PostgreSQL text cannot hold it."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain U+0000 (NUL)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _without_nul(key)
            _without_nul(item)
    elif isinstance(value, list):
        for item in value:
            _without_nul(item)


def _instants_in_range(value: Any) -> None:
    """Refuse a time that is no instant in UTC (``0001-01-01T00:00+01:00`` is before year 1),
    which no service could store, anywhere in a parsed command."""
    if isinstance(value, datetime):
        if value.utcoffset() is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(f"{value.isoformat()} is out of range") from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _instants_in_range(getattr(value, name))
    elif isinstance(value, list):
        for item in value:
            _instants_in_range(item)


class Command(BaseModel):
    """Base of command payloads: unknown fields are refused, not ignored, and so is anything the
    services could not store (a NUL character, a time out of range), which would otherwise
    fail deep inside a handler instead of as ``invalid_input``; over NATS and HTTP alike."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        _without_nul(data)
        return data

    @model_validator(mode="after")
    def _instants(self) -> Self:
        _instants_in_range(self)
        return self


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
