"""The audit log's rules, no I/O: what a record says, how records chain, how a chain is checked.

A record is one event as the audit log keeps it (design §4.3): tenant, actor (all six fields),
action, resource, the change (the event's data without secrets), correlation and causation ids,
when it happened and when it was recorded. Records form one chain per tenant: record ``seq`` n
stores the hash of record n-1 (``prev_hash``; the first stores :data:`GENESIS_HASH`) and its own
``hash`` = sha256("<seq>:<prev_hash>:<content digest>"), the content digest being sha256 of the
canonical JSON of all its other fields (computed before the chain is locked; the outer hash is
all that is left to do under the lock). So an edited record no longer matches its hash, a
re-hashed one no longer matches the hash its successor chained to, and a deleted one leaves a
gap in ``seq``.

Resource of an event: its type is the event type's entity (``scan`` for ``scan.accepted``) and
its id the entity's own id field in the data (``scan_id`` or ``scan_code``); when the data has
no such field, the first present of :data:`RESOURCE_ID_FIELDS` names both the type and the id
(``occupancy.changed`` with an ``event_id`` is about the ``event``). No id field: the id is None.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from typing import Any, Iterable, Literal, Mapping
from uuid import UUID

from libs.actor import Actor
from libs.envelope import Envelope
from libs.errors import InvalidInput

__all__ = [
    "GENESIS_HASH",
    "RESOURCE_ID_FIELDS",
    "ACTOR_FIELDS",
    "Entry",
    "Record",
    "ChainHead",
    "ChainProblem",
    "ChainVerifier",
    "entry_from_envelope",
    "resource_of",
    "strip_secrets",
    "is_secret_key",
    "canonical_json",
    "record_content",
    "content_digest",
    "link_hash",
    "record_hash",
    "Sealed",
    "seal",
    "chain",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record of every tenant's chain."""

RESOURCE_ID_FIELDS: tuple[str, ...] = (
    "scan_id",
    "entry_id",
    "refund_id",
    "checkout_id",
    "hold_id",
    "journal_entry_id",
    "ticket_code",
    "device_id",
    "api_key_id",
    "event_id",
    "organization_id",
)
"""Well-known id fields of event data, most specific first (a refund names its checkout and a
scan its ticket and event too: the refund or scan is what the event is about)."""

ACTOR_FIELDS: tuple[str, ...] = (
    "user_id",
    "organization_id",
    "role",
    "is_platform_admin",
    "is_platform_staff",
    "type",
)
"""The six fields of an actor (design §3), as a record stores them."""

# "<entity>.<verb>", lowercase words: the subject grammar of vge.evt.<org>.<svc>.<entity>.<verb>
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

# Key names that carry credentials or payment data. Matched case-insensitively on the whole
# key, plus the patterns in is_secret_key; ids of credentials (api_key_id) are not secrets.
_SECRET_KEYS = frozenset(
    {
        "payment_token",
        "api_key",
        "token",
        "password",
        "secret",
        "private_key",
        "cvv",
        "cvc",
        "pin",
        "authorization",
    }
)
_SECRET_SUFFIXES = ("_token", "_secret", "_password", "_private_key")


@lru_cache(maxsize=4096)  # the same few keys come by thousands of times a second
def is_secret_key(key: str) -> bool:
    """Whether a data key names a secret the audit log must never store."""
    k = key.lower()
    return (
        k in _SECRET_KEYS
        or k.startswith("card")
        or k.endswith(_SECRET_SUFFIXES)
        or "password" in k
        or "secret" in k
    )


def strip_secrets(value: Any) -> Any:
    """``value`` with every secret key dropped, at any depth (dicts inside lists too)."""
    # concrete types, not typing.Mapping: event data is parsed JSON, and the ABC check costs
    # more than the rest of this function on the ingest path
    if isinstance(value, dict):
        return {k: strip_secrets(v) for k, v in value.items() if not is_secret_key(str(k))}
    if isinstance(value, (list, tuple)):
        return [strip_secrets(v) for v in value]
    return value


def resource_of(event_type: str, data: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(resource_type, resource_id)`` of an event (rules in the module docstring)."""
    entity = event_type.split(".", 1)[0]
    for name in (f"{entity}_id", f"{entity}_code"):
        if data.get(name) is not None:
            return entity, str(data[name])
    for name in RESOURCE_ID_FIELDS:
        if data.get(name) is not None:
            return name.removesuffix("_id").removesuffix("_code"), str(data[name])
    return entity, None


@dataclass(frozen=True)  # no slots: change_json is cached on the instance
class Entry:
    """What one event says, before it takes its place in its tenant's chain."""

    organization_id: UUID
    event_id: UUID
    action: str
    resource_type: str
    resource_id: str | None
    actor: Mapping[str, Any]
    change: Mapping[str, Any]
    correlation_id: str
    causation_id: str | None
    occurred_at: datetime

    @cached_property
    def change_json(self) -> str:
        """The change's canonical JSON: what is stored and hashed (computed once per entry)."""
        return canonical_json(self.change)


@dataclass(frozen=True, slots=True)
class Record:
    """An entry in its chain: position, time recorded, link to the previous record, own hash."""

    entry: Entry
    seq: int
    recorded_at: datetime
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of a tenant's chain: its ``seq`` (0 for an empty chain) and hash."""

    seq: int = 0
    hash: str = GENESIS_HASH


ProblemKind = Literal["tampered", "broken_link", "missing"]


@dataclass(frozen=True, slots=True)
class ChainProblem:
    """The first thing wrong with a chain.

    ``tampered``: record ``seq`` does not match its own hash (edited in place).
    ``broken_link``: record ``seq`` matches its hash but not the hash its successor (or the chain
    head) chained to (edited and re-hashed), or it links to the wrong predecessor.
    ``missing``: there is no record ``seq`` although the chain goes on (deleted, or a gap).
    """

    seq: int
    kind: ProblemKind
    detail: str
    event_id: UUID | None = None


def entry_from_envelope(envelope: Envelope) -> Entry:
    """The audit entry of one event; ``InvalidInput`` when the event cannot be recorded."""
    if not _EVENT_TYPE.match(envelope.type):
        raise InvalidInput(f"event type {envelope.type!r} is not '<entity>.<verb>'")
    if not envelope.correlation_id:
        raise InvalidInput("event has no correlation id")
    if envelope.occurred_at.utcoffset() is None:
        raise InvalidInput("event occurred_at has no timezone")
    change = strip_secrets(envelope.data)
    resource_type, resource_id = resource_of(envelope.type, envelope.data)
    for name, text in (
        ("correlation_id", envelope.correlation_id),
        ("causation_id", envelope.causation_id),
        ("actor.user_id", envelope.actor.user_id),
        ("resource id", resource_id),
    ):
        if text is not None and "\x00" in text:  # PostgreSQL text cannot hold NUL
            raise InvalidInput(f"event {name} contains a NUL character")
    entry = Entry(
        organization_id=envelope.org_id,
        event_id=envelope.event_id,
        action=envelope.type,
        resource_type=resource_type,
        resource_id=resource_id,
        actor=_actor_fields(envelope.actor),
        change=change,
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
        occurred_at=envelope.occurred_at,
    )
    try:
        entry.change_json  # noqa: B018 - computed now (and kept) so a bad value fails here
    except ValueError as exc:  # NaN or infinity: JSON cannot say it, so no hash can cover it
        raise InvalidInput(f"event data cannot be recorded: {exc}") from None
    return entry


def _actor_fields(actor: Actor) -> dict[str, Any]:
    # by hand rather than model_dump: same JSON values, a fraction of the cost per event
    return {
        "user_id": actor.user_id,
        "organization_id": None if actor.organization_id is None else str(actor.organization_id),
        "role": None if actor.role is None else actor.role.value,
        "is_platform_admin": actor.is_platform_admin,
        "is_platform_staff": actor.is_platform_staff,
        "type": actor.type.value,
    }


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value``: sorted keys, no spaces, ASCII only, no NaN.

    It is what the hash covers and what the record stores as its change, so the hash can be
    recomputed from the stored record byte for byte. ``ValueError`` for NaN or infinity.
    """
    return _CANONICAL.encode(value)


# check_circular off: the values are parsed JSON and the records built from them, never cyclic
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, check_circular=False
)


def _timestamp(value: datetime) -> str:
    # one spelling whatever zone the value came in (the database hands back UTC)
    if value.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def record_content(entry: Entry, recorded_at: datetime | str) -> dict[str, Any]:
    """Every field of a record but its place in the chain, as JSON-ready values (``recorded_at``
    may come already spelled, as ``seal`` does for a batch that shares it)."""
    return {
        "organization_id": str(entry.organization_id),
        "event_id": str(entry.event_id),
        "action": entry.action,
        "resource_type": entry.resource_type,
        "resource_id": entry.resource_id,
        "actor": {name: entry.actor.get(name) for name in ACTOR_FIELDS},
        "change": entry.change,
        "correlation_id": entry.correlation_id,
        "causation_id": entry.causation_id,
        "occurred_at": _timestamp(entry.occurred_at),
        "recorded_at": recorded_at if isinstance(recorded_at, str) else _timestamp(recorded_at),
    }


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


_KEYS_BEFORE_CHANGE = ("action", "actor", "causation_id")  # record_content keys < "change"


def content_digest(entry: Entry, recorded_at: datetime | str) -> str:
    """sha256 (hex) of the canonical JSON of the record's content (``record_content``)."""
    # Built around the change's cached JSON rather than serializing it again: the keys before
    # "change" in sorted order, the change, the keys after it. Same bytes as
    # canonical_json(record_content(...)) (a unit test holds the two together).
    content = record_content(entry, recorded_at)
    del content["change"]
    before = {k: content.pop(k) for k in _KEYS_BEFORE_CHANGE}
    return _sha256(
        f'{canonical_json(before)[:-1]},"change":{entry.change_json},{canonical_json(content)[1:]}'
    )



def link_hash(digest: str, seq: int, prev_hash: str) -> str:
    """A record's hash: sha256 of ``"<seq>:<prev_hash>:<content digest>"`` (all three of fixed
    spelling: decimal, 64 hex, 64 hex). Cheap, so the work done while the tenant's chain is
    locked stays small."""
    return _sha256(f"{seq}:{prev_hash}:{digest}")


def record_hash(entry: Entry, seq: int, recorded_at: datetime | str, prev_hash: str) -> str:
    """The hash a record at ``seq`` after ``prev_hash`` must carry."""
    return link_hash(content_digest(entry, recorded_at), seq, prev_hash)


@dataclass(frozen=True, slots=True)
class Sealed:
    """An entry with its recording time, its content fixed by a digest: ready to be chained."""

    entry: Entry
    recorded_at: datetime
    digest: str


def seal(entries: Iterable[Entry], recorded_at: datetime) -> list[Sealed]:
    """Digest each entry's content (the costly part of hashing, done before any lock)."""
    spelled = _timestamp(recorded_at)
    return [Sealed(e, recorded_at, content_digest(e, spelled)) for e in entries]


def chain(sealed: Iterable[Sealed], head: ChainHead) -> tuple[list[Record], ChainHead]:
    """Append sealed entries (one tenant's, in order) after ``head``: the records and new head."""
    records: list[Record] = []
    seq, prev = head.seq, head.hash
    for item in sealed:
        seq += 1
        digest = link_hash(item.digest, seq, prev)
        records.append(Record(item.entry, seq, item.recorded_at, prev, digest))
        prev = digest
    return records, ChainHead(seq, prev)


@dataclass
class ChainVerifier:
    """Walks one tenant's chain in ``seq`` order, a page at a time, up to the first problem.

    ``feed`` the records (ordered by ``seq``) in as many pages as needed, then ``finish`` with the
    chain head, which must point at the last record.
    """

    checked: int = 0
    problem: ChainProblem | None = None
    _last: Record | None = field(default=None, repr=False)

    @property
    def last_seq(self) -> int:
        """``seq`` of the last record that was checked (0 before any)."""
        return self._last.seq if self._last else 0

    @property
    def last_hash(self) -> str:
        """Hash of the last record that was checked."""
        return self._last.hash if self._last else GENESIS_HASH

    def feed(self, records: Iterable[Record]) -> ChainProblem | None:
        """Check the next records; returns (and keeps) the first problem found."""
        for record in records:
            if self.problem is not None:
                break
            self.problem = self._check(record)
            if self.problem is None:
                self.checked += 1
                self._last = record
        return self.problem

    def _check(self, record: Record) -> ChainProblem | None:
        expected = self.last_seq + 1
        if record.seq != expected:
            # the records are read in seq order, so a different seq can only be a later one
            last_missing = record.seq - 1
            missing = f"{expected}" if last_missing == expected else f"{expected}..{last_missing}"
            return ChainProblem(
                expected, "missing", f"record(s) {missing} missing before {record.seq}"
            )
        own = record_hash(record.entry, record.seq, record.recorded_at, record.prev_hash)
        if own != record.hash:
            return ChainProblem(
                record.seq, "tampered", "content does not match its hash", record.entry.event_id
            )
        if record.prev_hash != self.last_hash:
            if self._last is None:
                return ChainProblem(
                    record.seq, "broken_link", "first record does not start from the genesis hash",
                    record.entry.event_id,
                )
            # Both records match their own hashes, so the earlier one was rewritten and re-hashed
            # after the later one had chained to it: the earlier one is the edited record.
            return ChainProblem(
                self._last.seq, "broken_link",
                f"hash differs from the one record {record.seq} chained to "
                "(rewritten and re-hashed)",
                self._last.entry.event_id,
            )
        return None

    def finish(self, head: ChainHead | None) -> ChainProblem | None:
        """Compare the chain head with the last record; returns the first problem, if any."""
        if self.problem is not None:
            return self.problem
        if head is None:
            if self._last is not None:
                self.problem = ChainProblem(
                    self.last_seq, "broken_link", "records without a chain head"
                )
        elif head.seq > self.last_seq:
            first = self.last_seq + 1
            missing = f"{first}" if head.seq == first else f"{first}..{head.seq}"
            self.problem = ChainProblem(first, "missing", f"record(s) {missing} missing at the end")
        elif head.seq < self.last_seq:
            self.problem = ChainProblem(
                head.seq + 1, "broken_link", f"record(s) beyond the chain head ({head.seq})"
            )
        elif head.hash != self.last_hash:
            assert self._last is not None
            self.problem = ChainProblem(
                self._last.seq, "broken_link",
                "hash differs from the chain head's (rewritten and re-hashed)",
                self._last.entry.event_id,
            )
        return self.problem


def verify_chain(records: Iterable[Record], head: ChainHead | None) -> ChainProblem | None:
    """The first problem of a whole chain (records in ``seq`` order), or None if it is intact."""
    verifier = ChainVerifier()
    verifier.feed(records)
    return verifier.finish(head)

