"""The envelope every event travels in (design §3), and UUIDv7 ids."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import uuid_utils
from pydantic import BaseModel, ConfigDict, Field

from libs.actor import Actor

__all__ = ["Envelope", "new_id", "utcnow"]


def new_id() -> UUID:
    """A new UUIDv7: time-ordered, so ids index well and sort by creation."""
    return UUID(bytes=uuid_utils.uuid7().bytes)


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


class Envelope(BaseModel):
    """One domain event: who did what, in which tenant, as part of which request."""

    model_config = ConfigDict(frozen=True)

    event_id: UUID = Field(default_factory=new_id)
    type: str = Field(description="Dotted event type, e.g. 'scan.accepted'.")
    schema_version: int = 1
    occurred_at: datetime = Field(default_factory=utcnow)
    org_id: UUID
    actor: Actor
    correlation_id: str
    causation_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """JSON on the wire."""
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Envelope":
        """Parse an event from the wire; raises pydantic.ValidationError on bad input."""
        return cls.model_validate_json(raw)
