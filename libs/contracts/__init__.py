"""Every command, reply and event payload of the platform, as pydantic models.

Defined once here so producers and consumers share one shape and every service's AsyncAPI comes
from the same models. Commands are named as imperatives (``AdmitTicket``), events in the past
tense (``TicketAdmitted``). An event model is the envelope's ``data``; ``EventData.envelope``
wraps it and ``EventData.from_envelope`` reads it back.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Self, get_args, get_origin
from uuid import UUID

from pydantic import BaseModel, ConfigDict, model_validator

from libs.actor import Actor
from libs.envelope import Envelope

__all__ = ["Command", "Reply", "EventData", "CHECKED_INSTANT"]


class CheckedInstant:
    """Marks a time type whose own validator already makes every value an instant in UTC
    (``Annotated[datetime, AfterValidator(...), CHECKED_INSTANT]``): the command rules below
    need not look at it again."""


CHECKED_INSTANT = CheckedInstant()

_OPAQUE = (UUID, bool, int, float, Enum)  # parsed values that can hold no text and no time


def _may_hold_unchecked(tp: Any) -> bool:
    """Whether a value of type ``tp`` may hold text or a time not yet checked."""
    origin = get_origin(tp)
    if origin is Annotated:
        return CHECKED_INSTANT not in tp.__metadata__ and _may_hold_unchecked(get_args(tp)[0])
    if origin is Literal or tp is type(None):
        return False
    if origin is not None:  # a union or a container: whatever its parts may hold
        return any(_may_hold_unchecked(arg) for arg in get_args(tp)) or not get_args(tp)
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return bool(_fields_to_check(tp))
        if issubclass(tp, str):
            return not issubclass(tp, Enum)
        if issubclass(tp, _OPAQUE):
            return False
    return True  # Any, datetime, anything unknown: look


@cache
def _fields_to_check(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``cls`` the command rules must look into (worked out once per model, so
    an upload of 10,000 scans is not 80,000 ``getattr`` calls)."""
    return tuple(
        name for name, f in cls.model_fields.items()
        if CHECKED_INSTANT not in f.metadata and _may_hold_unchecked(f.annotation)
    )  # fmt: skip


def _storable(value: Any) -> None:
    """Refuse what no service could store, anywhere in a parsed command: U+0000 in text
    (PostgreSQL text cannot hold it), and a time that is no instant in UTC
    (``0001-01-01T00:00+01:00`` is before year 1)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain U+0000 (NUL)")
    elif isinstance(value, BaseModel):
        for name in _fields_to_check(type(value)):
            _storable(getattr(value, name))
    elif isinstance(value, datetime):
        if value.utcoffset() is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(f"{value.isoformat()} is out of range") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key)
            _storable(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _storable(item)


class Command(BaseModel):
    """Base of command payloads: unknown fields are refused, not ignored, and so is anything the
    services could not store (a NUL character, a time out of range), which would otherwise
    fail deep inside a handler instead of as ``invalid_input``; over NATS and HTTP alike."""

    model_config = ConfigDict(extra="forbid")

    # after, not before, validation: a "before" validator makes pydantic build the whole JSON
    # as Python objects first, and walk them again; this looks only where text or times can be
    @model_validator(mode="after")
    def _storable_only(self) -> Self:
        _storable(self)
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
