"""The audit domain: record content and hashes, chaining, verification, secret stripping."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest

from libs.actor import Actor, ActorType, Role
from libs.envelope import Envelope
from libs.errors import InvalidInput
from services.audit.domain import (
    GENESIS_HASH,
    canonical_json,
    content_digest,
    record_content,
    ChainHead,
    ChainVerifier,
    Record,
    chain,
    entry_from_envelope,
    record_hash,
    resource_of,
    seal,
    strip_secrets,
    verify_chain,
)

pytestmark = pytest.mark.unit

ORG = UUID("0190a3c4-0000-7000-8000-00000000000a")
OWNER = Actor(user_id="u-1", organization_id=ORG, role=Role.OWNER, type=ActorType.USER)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def envelope(n: int = 0, type_: str = "scan.accepted", **data: object) -> Envelope:
    return Envelope(
        type=type_, org_id=ORG, actor=OWNER, correlation_id=f"corr-{n}",
        occurred_at=T0 + timedelta(seconds=n), data={"scan_id": f"s{n}", "n": n, **data},
    )


def records(count: int) -> list[Record]:
    entries = [entry_from_envelope(envelope(n)) for n in range(count)]
    recs, _ = chain(seal(entries, T0 + timedelta(minutes=1)), ChainHead())
    return recs


def head_of(recs: list[Record]) -> ChainHead:
    return ChainHead(recs[-1].seq, recs[-1].hash) if recs else ChainHead()


def edited(record: Record, **change: object) -> Record:
    """What an UPDATE of the stored change does: new content, the stored hash kept."""
    return replace(record, entry=replace(record.entry, change={**record.entry.change, **change}))


def rehashed(record: Record) -> Record:
    e = record.entry
    return replace(record, hash=record_hash(e, record.seq, record.recorded_at, record.prev_hash))


# -- entries ---------------------------------------------------------------------------------


def test_entry_keeps_who_what_where_and_when() -> None:
    env = envelope(3, ticket_code="TCK-1", event_id=str(uuid4()))
    entry = entry_from_envelope(env)
    assert entry.organization_id == ORG and entry.event_id == env.event_id
    assert entry.action == "scan.accepted"
    assert (entry.resource_type, entry.resource_id) == ("scan", "s3")
    assert entry.actor == {
        "user_id": "u-1", "organization_id": str(ORG), "role": "owner",
        "is_platform_admin": False, "is_platform_staff": False, "type": "user",
    }
    assert entry.correlation_id == "corr-3" and entry.occurred_at == T0 + timedelta(seconds=3)
    assert entry.change["ticket_code"] == "TCK-1"


@pytest.mark.parametrize(
    ("event_type", "data", "expected"),
    [
        ("ticket.issued", {"ticket_code": "T1", "event_id": "E", "checkout_id": "C"}, ("ticket", "T1")),
        ("refund.completed", {"checkout_id": "C", "refund_id": "R"}, ("refund", "R")),
        ("checkout.completed", {"checkout_id": "C", "event_id": "E"}, ("checkout", "C")),
        ("event.created", {"event_id": "E", "name": "x"}, ("event", "E")),
        ("occupancy.changed", {"event_id": "E", "inside": 3}, ("event", "E")),
        ("hold.expired", {"checkout_id": "C"}, ("checkout", "C")),
        ("device.enrolled", {}, ("device", None)),
        ("scan.rejected", {"scan_id": 7}, ("scan", "7")),
    ],
)
def test_resource_is_the_entity_and_its_id(event_type, data, expected) -> None:
    assert resource_of(event_type, data) == expected


def test_secrets_are_dropped_at_any_depth_and_ids_kept() -> None:
    data = {
        "payment_token": "tok_ok", "api_key": "k", "Token": "t", "password": "p", "secret": "s",
        "card_number": "4111", "cardholder": "A B", "enrolment_token": "e", "client_secret": "c",
        "api_key_id": "key-1", "ticket_code": "T1", "amount": 100,
        "customer": {"email": "a@b.c", "password_hash": "h", "cards": [1]},
        "payments": [{"card_last4": "1111", "amount": 5}, {"device_token": "d", "id": 2}],
    }
    assert strip_secrets(data) == {
        "api_key_id": "key-1", "ticket_code": "T1", "amount": 100,
        "customer": {"email": "a@b.c"},
        "payments": [{"amount": 5}, {"id": 2}],
    }
    entry = entry_from_envelope(envelope(1, payment_token="tok_ok", nested={"card": {"cvv": 1}}))
    assert "payment_token" not in entry.change and entry.change["nested"] == {}
    assert "tok_ok" not in json.dumps(entry.change)


@pytest.mark.parametrize("bad_type", ["garbage", "", "Scan.Accepted", "scan.", "scan..x", "a b.c"])
def test_event_type_must_be_entity_dot_verb(bad_type: str) -> None:
    with pytest.raises(InvalidInput):
        entry_from_envelope(envelope(type_=bad_type))


def test_unrepresentable_numbers_are_refused() -> None:
    with pytest.raises(InvalidInput):
        entry_from_envelope(envelope(x=float("nan")))
    with pytest.raises(InvalidInput):
        entry_from_envelope(envelope(x=[{"y": float("inf")}]))


def test_what_postgresql_cannot_store_is_refused_not_retried() -> None:
    with pytest.raises(InvalidInput, match="resource id"):
        entry_from_envelope(envelope(scan_id="s\x001"))
    with pytest.raises(InvalidInput, match="correlation_id"):
        entry_from_envelope(envelope().model_copy(update={"correlation_id": "c\x00"}))
    with pytest.raises(InvalidInput, match="timezone"):
        entry_from_envelope(envelope().model_copy(update={"occurred_at": datetime(2025, 1, 1)}))
    # NUL inside the change is fine: it is stored as JSON text, escaped
    assert entry_from_envelope(envelope(note="a\x00b")).change["note"] == "a\x00b"


# -- hashing ---------------------------------------------------------------------------------


def test_hash_covers_every_field_and_the_previous_hash() -> None:
    entry = entry_from_envelope(envelope(1))
    base = record_hash(entry, 1, T0, GENESIS_HASH)
    assert base == record_hash(entry, 1, T0, GENESIS_HASH)  # deterministic
    assert len(base) == 64 and int(base, 16) >= 0
    variants = [
        record_hash(entry, 2, T0, GENESIS_HASH),
        record_hash(entry, 1, T0 + timedelta(microseconds=1), GENESIS_HASH),
        record_hash(entry, 1, T0, "1" * 64),
        record_hash(replace(entry, change={**entry.change, "n": 2}), 1, T0, GENESIS_HASH),
        record_hash(replace(entry, actor={**entry.actor, "role": "admin"}), 1, T0, GENESIS_HASH),
        record_hash(replace(entry, resource_id="other"), 1, T0, GENESIS_HASH),
        record_hash(replace(entry, correlation_id="x"), 1, T0, GENESIS_HASH),
        record_hash(replace(entry, organization_id=uuid4()), 1, T0, GENESIS_HASH),
        record_hash(replace(entry, occurred_at=entry.occurred_at + timedelta(seconds=1)), 1, T0, GENESIS_HASH),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_hash_is_the_same_after_a_storage_round_trip() -> None:
    """What the database hands back (UTC times, JSON re-parsed, key order lost) hashes the same."""
    entry = entry_from_envelope(envelope(1, price=12.5, big=2**62, text="naïve \u0000 ✓", z=1, a=[1.0]))
    stored = replace(
        entry,
        change=json.loads(json.dumps(dict(reversed(list(entry.change.items()))))),
        occurred_at=entry.occurred_at.astimezone(timezone(timedelta(hours=2))),
    )
    assert record_hash(stored, 1, T0, GENESIS_HASH) == record_hash(entry, 1, T0, GENESIS_HASH)


def test_content_digest_is_sha256_of_the_canonical_content() -> None:
    for entry in (
        entry_from_envelope(envelope(1, nested={"z": [1, {"b": None}], "a": "é"})),
        entry_from_envelope(envelope(2).model_copy(update={"causation_id": None, "data": {}})),
    ):
        expected = hashlib.sha256(canonical_json(record_content(entry, T0)).encode()).hexdigest()
        assert content_digest(entry, T0) == expected
    assert sorted(record_content(entry, T0)) == list(  # the splice relies on these being first
        ("action", "actor", "causation_id", "change")) + sorted(
        k for k in record_content(entry, T0) if k > "change")


def test_chain_links_records_from_the_head() -> None:
    first, head = chain(seal([entry_from_envelope(envelope(n)) for n in range(3)], T0), ChainHead())
    assert [r.seq for r in first] == [1, 2, 3]
    assert first[0].prev_hash == GENESIS_HASH
    assert [r.prev_hash for r in first[1:]] == [r.hash for r in first[:-1]]
    assert head == ChainHead(3, first[-1].hash)
    more, head2 = chain(seal([entry_from_envelope(envelope(9))], T0), head)
    assert (more[0].seq, more[0].prev_hash) == (4, first[-1].hash)
    assert head2.seq == 4


# -- verification ----------------------------------------------------------------------------


def test_intact_chain_verifies() -> None:
    recs = records(5)
    assert verify_chain(recs, head_of(recs)) is None
    assert verify_chain([], ChainHead()) is None
    assert verify_chain([], None) is None


def test_edited_record_is_reported_as_tampered() -> None:
    recs = records(6)
    recs[3] = edited(recs[3], n=999)
    problem = verify_chain(recs, head_of(recs))
    assert problem is not None
    assert (problem.seq, problem.kind, problem.event_id) == (4, "tampered", recs[3].entry.event_id)


def test_edited_and_rehashed_record_is_reported_as_that_record() -> None:
    recs = records(6)
    recs[2] = rehashed(edited(recs[2], n=999))
    problem = verify_chain(recs, head_of(records(6)))
    assert problem is not None and (problem.seq, problem.kind) == (3, "broken_link")
    # the last record too: the head is what it is checked against
    recs = records(4)
    head = head_of(recs)
    recs[-1] = rehashed(edited(recs[-1], n=999))
    problem = verify_chain(recs, head)
    assert problem is not None and (problem.seq, problem.kind) == (4, "broken_link")


def test_deleted_record_is_reported_as_missing() -> None:
    recs = records(6)
    head = head_of(recs)
    problem = verify_chain(recs[:2] + recs[3:], head)
    assert problem is not None and (problem.seq, problem.kind) == (3, "missing")
    problem = verify_chain(recs[1:], head)
    assert problem is not None and (problem.seq, problem.kind) == (1, "missing")
    problem = verify_chain(recs[:4], head)  # the tail: only the head knows
    assert problem is not None and (problem.seq, problem.kind) == (5, "missing")
    assert "5..6" in problem.detail


def test_gap_of_several_records_names_the_first() -> None:
    recs = records(8)
    problem = verify_chain(recs[:2] + recs[5:], head_of(recs))
    assert problem is not None and (problem.seq, problem.kind) == (3, "missing")
    assert "3..5" in problem.detail


def test_reordered_records_are_detected() -> None:
    recs = records(5)
    # swapping the positions of two records (their seq values) breaks their own hashes
    swapped = recs[:1] + [replace(recs[2], seq=2), replace(recs[1], seq=3)] + recs[3:]
    problem = verify_chain(swapped, head_of(recs))
    assert problem is not None and (problem.seq, problem.kind) == (2, "tampered")
    # and a list that is not in seq order is a gap where the order breaks
    problem = verify_chain([recs[0], recs[2], recs[1]] + recs[3:], head_of(recs))
    assert problem is not None and (problem.seq, problem.kind) == (2, "missing")


def test_record_beyond_the_head_and_missing_head_are_reported() -> None:
    recs = records(3)
    problem = verify_chain(recs, ChainHead(2, recs[1].hash))
    assert problem is not None and (problem.seq, problem.kind) == (3, "broken_link")
    problem = verify_chain(recs, None)
    assert problem is not None and problem.kind == "broken_link"


def test_first_record_must_start_at_genesis() -> None:
    recs = records(2)
    forged = rehashed(replace(recs[0], prev_hash="f" * 64))
    problem = verify_chain([forged, recs[1]], head_of(recs))
    assert problem is not None and (problem.seq, problem.kind) == (1, "broken_link")


def test_verifier_fed_in_pages_agrees_and_stops_at_first_problem() -> None:
    recs = records(10)
    recs[6] = edited(recs[6], n=-1)
    recs[8] = edited(recs[8], n=-1)
    verifier = ChainVerifier()
    for i in range(0, 10, 3):
        verifier.feed(recs[i : i + 3])
    problem = verifier.finish(head_of(records(10)))
    assert problem == verify_chain(recs, head_of(records(10)))
    assert problem is not None and problem.seq == 7
    assert verifier.checked == 6 and verifier.last_seq == 6

