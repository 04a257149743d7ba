"""Scanning's pure logic (no I/O): the dedup tiers' rules and the order scans are applied in.

The authoritative decision (design §5, tier 3) is made by the database function
``decide_scans`` (migrations/0002; its current text is in 0006) so that a batch of concurrent
scans costs one round trip; what is decided here is only what can be decided without the
authority: whether a scan is a known duplicate of an admission this replica (tier 1) or the
cluster (tier 2) already saw.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from datetime import datetime
from typing import Callable, NamedTuple, Sequence
from uuid import UUID

from libs.contracts.scanning import Direction, OfflineScan

__all__ = [
    "Admission",
    "AdmissionCache",
    "claim_key",
    "encode_admission",
    "decode_admission",
    "duplicate_of",
    "offline_apply_order",
    "Breaker",
    "CLAIM_WINDOW_SECONDS",
]

CLAIM_WINDOW_SECONDS = 300


class Admission(NamedTuple):
    """The first admission of a ticket at an event that allows no re-entry: once admitted,
    every later entry is ``already_admitted``. (Immutable; a named tuple, because an upload
    makes 10,000 of them and a frozen dataclass costs ~3 µs each.)"""

    event_id: UUID
    ticket_type: str | None
    first_admitted_at: datetime
    first_gate: str | None
    device_id: str
    nonce: str


def claim_key(org_id: UUID, ticket_code: str) -> str:
    """The Redis key of a ticket's admission (design §5)."""
    return f"voelgoed:scans:{org_id}:{ticket_code}"


def encode_admission(admission: Admission) -> str:
    """Redis value of an admission."""
    # by hand, not dataclasses.asdict (a deep copy): this runs for every admission
    return json.dumps(
        {
            "event_id": str(admission.event_id),
            "ticket_type": admission.ticket_type,
            "first_admitted_at": admission.first_admitted_at.isoformat(),
            "first_gate": admission.first_gate,
            "device_id": admission.device_id,
            "nonce": admission.nonce,
        },
        separators=(",", ":"),
    )


def decode_admission(value: str | None) -> Admission | None:
    """The admission stored in Redis, or None for a missing or unreadable value (never trust
    a value we cannot read: the authority decides then)."""
    if not value:
        return None
    try:
        data = json.loads(value)
        return Admission(
            event_id=UUID(data["event_id"]),
            ticket_type=data.get("ticket_type"),
            first_admitted_at=datetime.fromisoformat(data["first_admitted_at"]),
            first_gate=data.get("first_gate"),
            device_id=data["device_id"],
            nonce=data["nonce"],
        )
    except (ValueError, KeyError, TypeError):
        return None


def duplicate_of(
    admission: Admission | None, *, event_id: UUID, direction: Direction, device_id: str, nonce: str
) -> Admission | None:
    """The admission that makes this scan a known duplicate, or None if only the authority can
    tell (no admission known, an exit, another event, or the admitting scan's own retry, which
    must get its first decision back, not a rejection)."""
    if admission is None or direction is not Direction.ENTRY:
        return None
    if admission.event_id != event_id:
        return None
    if admission.device_id == device_id and admission.nonce == nonce:
        return None
    return admission


class AdmissionCache:
    """Tier 1: recent admissions in this process, for sub-millisecond duplicate detection.

    Bounded (least recently used out first) and expiring, so it never grows without limit.
    """

    def __init__(
        self,
        ttl_seconds: float = CLAIM_WINDOW_SECONDS,
        max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        # Keys and entries hold only ints, strings, floats and datetimes, never a UUID: a tuple
        # of such values leaves the garbage collector's lists at the first collection that
        # sees it. With UUIDs in, every cached admission (up to 200,000, ~3 objects each) stayed
        # tracked, walked by each collection of its generation with the event loop stopped.
        self._entries: OrderedDict[tuple[int, str], tuple[float, int, str | None, datetime, str | None, str, str]] = (
            OrderedDict())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, org_id: UUID, ticket_code: str) -> Admission | None:
        """The cached admission, if fresh."""
        key = (org_id.int, ticket_code)
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] < self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        _, event_id, ticket_type, first_admitted_at, first_gate, device_id, nonce = hit
        return Admission(UUID(int=event_id), ticket_type, first_admitted_at, first_gate, device_id, nonce)

    def put(self, org_id: UUID, ticket_code: str, admission: Admission, *, replace: bool = False) -> None:
        """Remember an admission. The first one stays unless ``replace``: the authority moved
        the admission to an earlier offline scan."""
        key = (org_id.int, ticket_code)
        if not replace and key in self._entries and self._entries[key][0] >= self._clock():
            return
        self._entries[key] = (self._clock() + self._ttl, admission.event_id.int, *admission[1:])
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, org_id: UUID, ticket_code: str) -> None:
        """Drop a ticket (e.g. it was cancelled)."""
        self._entries.pop((org_id.int, ticket_code), None)


def offline_apply_order(scans: Sequence[OfflineScan]) -> list[int]:
    """Indexes of an offline batch in the order to apply it: by the device's ``scanned_at``,
    upload order breaking ties (so the physical sequence is replayed)."""
    return sorted(range(len(scans)), key=lambda i: (scans[i].scanned_at, i))


class Breaker:
    """Skip a failing dependency for a while instead of paying its timeout on every scan."""

    def __init__(self, cooldown_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._open_until = 0.0

    @property
    def closed(self) -> bool:
        """True when the dependency may be tried."""
        return self._clock() >= self._open_until

    def failed(self) -> None:
        """Record a failure: stop trying for the cooldown."""
        self._open_until = self._clock() + self._cooldown
