"""Scanning's commands, replies and events (design §5)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, ClassVar
from uuid import UUID

from pydantic import AfterValidator, BaseModel, Field

from libs.contracts import CHECKED_INSTANT, Command, EventData, Reply

__all__ = [
    "Direction",
    "ScanOutcome",
    "RejectReason",
    "ScanTicket",
    "ScanDecision",
    "OfflineScan",
    "SyncOfflineScans",
    "OfflineScanDecision",
    "OfflineScansSynced",
    "GetOccupancy",
    "Occupancy",
    "OccupancyCount",
    "ScanAccepted",
    "ScanRejected",
    "OccupancyChanged",
    "MAX_SYNC_BATCH",
]

MAX_SYNC_BATCH = 10_000


class Direction(StrEnum):
    """Which way the ticket holder passes the gate."""

    ENTRY = "entry"
    EXIT = "exit"


class ScanOutcome(StrEnum):
    """The gate's answer."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


class RejectReason(StrEnum):
    """Why a scan was rejected: the fixed vocabulary of design §5."""

    ALREADY_ADMITTED = "already_admitted"
    UNKNOWN_TICKET = "unknown_ticket"
    CANCELLED = "cancelled"
    WRONG_EVENT = "wrong_event"
    NOT_VALID_NOW = "not_valid_now"
    ZONE_DENIED = "zone_denied"
    NOT_INSIDE = "not_inside"
    DEVICE_NOT_ALLOWED = "device_not_allowed"


def _in_utc(value: datetime) -> datetime:
    """A device's clock reading as an aware UTC instant (naive readings are taken as UTC).

    ISO 8601 allows offsets up to +-23:59, PostgreSQL only up to +-15:59, and naive and aware
    values cannot be compared when a batch is sorted: so every reading is normalised here, once.
    """
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise ValueError("scanned_at is out of range") from None


DeviceTime = Annotated[datetime, AfterValidator(_in_utc), CHECKED_INSTANT]

_CODE = Field(min_length=1, max_length=128)
_NONCE = Field(min_length=1, max_length=128)
_GATE = Field(default=None, max_length=64)


class ScanTicket(Command):
    """Decide one scan now (online). The device is the acting principal of the context."""

    event_id: UUID
    ticket_code: str = _CODE
    direction: Direction = Direction.ENTRY
    gate: str | None = _GATE
    zone: str | None = Field(default=None, max_length=64, description="The zone behind the gate.")
    nonce: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="Device nonce: a retry with the same one returns the first decision.",
    )
    scanned_at: DeviceTime | None = Field(default=None, description="The device's clock.")
    device_event_id: UUID | None = Field(
        default=None,
        description="Set by the gateway from a device credential bound to one event.",
    )


class ScanDecision(Reply):
    """The answer to a scan."""

    result: ScanOutcome
    reason: RejectReason | None = None
    scan_id: UUID
    ticket_type: str | None = None
    first_admitted_at: datetime | None = None
    first_gate: str | None = None
    nonce: str | None = None
    conflict: bool = False
    replayed: bool = Field(default=False, description="A retry: this is the first decision.")


class OfflineScan(BaseModel):
    """A scan the device decided while offline."""

    event_id: UUID
    ticket_code: str = _CODE
    direction: Direction = Direction.ENTRY
    gate: str | None = _GATE
    zone: str | None = Field(default=None, max_length=64)
    nonce: str = _NONCE
    scanned_at: DeviceTime
    device_result: ScanOutcome = Field(
        default=ScanOutcome.ACCEPTED,
        description="What the device decided: an accepted scan physically happened.",
    )


class SyncOfflineScans(Command):
    """Upload a batch of offline scans; idempotent per (device, nonce)."""

    scans: list[OfflineScan] = Field(min_length=1, max_length=MAX_SYNC_BATCH)
    device_event_id: UUID | None = None


class OfflineScanDecision(Reply):
    """What the server recorded for one offline scan."""

    nonce: str
    result: ScanOutcome
    reason: RejectReason | None = None
    conflict: bool = False
    scan_id: UUID
    ticket_type: str | None = None
    first_admitted_at: datetime | None = None
    first_gate: str | None = None
    replayed: bool = False


class OfflineScansSynced(Reply):
    """One result per uploaded scan, in upload order."""

    results: list[OfflineScanDecision]


class GetOccupancy(Command):
    """The current occupancy of an event."""

    event_id: UUID


class OccupancyCount(BaseModel):
    """Entries, exits and (for ticket types) tickets inside, for one gate or ticket type."""

    key: str
    entries: int
    exits: int
    inside: int | None = None


class Occupancy(Reply):
    """Tickets inside an event now, with entries, exits and capacity."""

    event_id: UUID
    inside: int
    entries: int
    exits: int
    capacity: int | None
    updated_at: datetime | None
    by_gate: list[OccupancyCount] = Field(default_factory=list)
    by_ticket_type: list[OccupancyCount] = Field(default_factory=list)


class _ScanFacts(EventData):
    service: ClassVar[str] = "scanning"

    scan_id: UUID
    event_id: UUID
    ticket_code: str
    ticket_type: str | None
    direction: Direction
    gate: str | None
    zone: str | None
    device_id: str
    nonce: str
    scanned_at: datetime | None
    received_at: datetime
    offline: bool


class ScanAccepted(_ScanFacts):
    """A ticket passed a gate (entry or exit)."""

    event_type: ClassVar[str] = "scan.accepted"


class ScanRejected(_ScanFacts):
    """A scan was refused (or, offline, recorded as a conflict)."""

    event_type: ClassVar[str] = "scan.rejected"
    reason: RejectReason | None
    conflict: bool = False


class OccupancyChanged(EventData):
    """The latest occupancy of an event (coalesced: not one per scan)."""

    event_type: ClassVar[str] = "occupancy.changed"
    service: ClassVar[str] = "scanning"

    event_id: UUID
    inside: int
    entries: int
    exits: int
    capacity: int | None
    updated_at: datetime
    version: int


