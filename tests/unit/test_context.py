"""The signed command context: sign in the gateway, verify in every service."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.actor import Actor, ActorType, Role
from libs.context import (
    CONTEXT_HEADER,
    MAX_HEADER_LENGTH,
    CommandContext,
    ContextSigner,
    ContextVerifier,
    generate_key_pair,
    key_id,
    load_private_key,
    load_public_keys,
)
from libs.errors import ErrorCode, Unauthenticated

pytestmark = pytest.mark.unit

ORG = UUID("0190a3c4-0000-7000-8000-000000000001")
OTHER_ORG = UUID("0190a3c4-0000-7000-8000-000000000002")
SUBJECT = "vge.cmd.scanning.scan"
NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)

# Module-level keys (not fixtures) so hypothesis tests can use them too.
TRUSTED = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()

VIEWER = Actor(user_id="u-viewer", organization_id=ORG, role=Role.VIEWER, type=ActorType.USER)
PLATFORM_ADMIN = Actor(
    user_id="ops", organization_id=None, role=None, type=ActorType.USER, is_platform_admin=True
)


def fixed(at: datetime):  # noqa: ANN201 - a clock
    return lambda: at


def signer(key: Ed25519PrivateKey = TRUSTED) -> ContextSigner:
    return ContextSigner(key, clock=fixed(NOW))


def verifier(*keys: Ed25519PrivateKey, at: datetime = NOW) -> ContextVerifier:
    return ContextVerifier([k.public_key() for k in keys or (TRUSTED,)], clock=fixed(at))


def issue(actor: Actor = VIEWER, key: Ed25519PrivateKey = TRUSTED) -> tuple[CommandContext, str]:
    return signer(key).issue(actor, actor.organization_id, SUBJECT, "corr-1")


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refused(
    header: str | None, reason: str, *, subject: str = SUBJECT, v: ContextVerifier | None = None
) -> Unauthenticated:
    with pytest.raises(Unauthenticated) as info:
        (v or verifier()).verify(header, subject)
    assert info.value.extra == {"reason": reason}, info.value.detail
    assert info.value.code is ErrorCode.UNAUTHENTICATED
    return info.value


def sign_raw(payload: bytes, key: Ed25519PrivateKey = TRUSTED) -> str:
    """A header over arbitrary bytes, signed properly: tests what the verifier does after it
    trusts the signature."""
    return f"{b64e(payload)}.{b64e(key.sign(payload))}.{key_id(key.public_key())}"


# --- round trip -------------------------------------------------------------------------------


def test_round_trip() -> None:
    ctx, header = issue()
    assert CONTEXT_HEADER == "Vge-Context"
    assert verifier().verify(header, SUBJECT) == ctx
    assert ctx.actor == VIEWER and ctx.org_id == ORG and ctx.subject == SUBJECT
    assert ctx.correlation_id == "corr-1"
    assert ctx.expires_at == NOW + timedelta(seconds=30)
    assert UUID(ctx.message_id).version == 7


def test_header_shape_and_key_id() -> None:
    _, header = issue()
    payload, signature, kid = header.split(".")
    raw_public = TRUSTED.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert kid == hashlib.sha256(raw_public).hexdigest()[:16] == signer().key_id
    assert json.loads(b64d(payload))["subject"] == SUBJECT
    assert len(b64d(signature)) == 64
    assert "=" not in header


def test_issue_with_message_id_and_ttl() -> None:
    ctx, header = signer().issue(VIEWER, ORG, SUBJECT, "c", ttl_seconds=5, message_id="m-1")
    assert ctx.message_id == "m-1" and ctx.expires_at == NOW + timedelta(seconds=5)
    assert verifier().verify(header, SUBJECT).message_id == "m-1"
    with pytest.raises(ValueError):
        signer().issue(VIEWER, ORG, SUBJECT, "c", ttl_seconds=0)


def test_each_command_gets_its_own_message_id() -> None:
    assert issue()[0].message_id != issue()[0].message_id


def test_platform_admin_without_tenant_and_across_tenants() -> None:
    for org in (None, OTHER_ORG):
        ctx, header = signer().issue(PLATFORM_ADMIN, org, SUBJECT, "c")
        assert verifier().verify(header, SUBJECT).org_id == org


def test_system_and_device_actors_round_trip() -> None:
    for actor in (
        Actor.system("payments.saga", ORG),
        Actor(user_id="dev-1", organization_id=ORG, role=None, type=ActorType.DEVICE),
    ):
        ctx, header = issue(actor)
        assert verifier().verify(header, SUBJECT).actor == actor


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, ""])
def test_missing(header: str | None) -> None:
    refused(header, "missing")


def _garbage_headers() -> list[str]:
    _, good = issue()
    payload, signature, kid = good.split(".")
    return [
        "garbage",
        "a.b",
        f"{payload}.{signature}",
        f"{payload}.{signature}.{kid}.extra",
        f"{payload}..{kid}",
        f".{signature}.{kid}",
        f"{payload}.{signature}.",
        f"{payload}.{signature}.{kid.upper()}",  # key ids are lower-case hex
        f"{payload}.{signature}.nothex!nothex!ab",
        f"!!{payload}.{signature}.{kid}",  # not the base64url alphabet
        f"{payload}==.{signature}.{kid}",  # padding is not part of the format
        f"{payload[:-1]}+.{signature}.{kid}",  # standard-alphabet character
        f"{payload}.{signature[:-4]}.{kid}",  # a signature of the wrong length
        f"{payload}.{b64e(b'short')}.{kid}",
        f"AAAAA.{signature}.{kid}",  # base64 of an impossible length (4n+1)
        "x" * (MAX_HEADER_LENGTH + 1),
    ]  # fmt: skip


@pytest.mark.parametrize("header", _garbage_headers())
def test_malformed(header: str) -> None:
    refused(header, "malformed")


def test_non_canonical_base64_spelling_is_refused() -> None:
    # 64 signature bytes are 86 base64 chars; the last one carries 4 unused bits. A lenient
    # decoder maps several spellings to the same signature, so an edited header would still
    # verify; the verifier accepts only the canonical spelling.
    _, header = issue()
    payload, signature, kid = header.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    twin = alphabet[last | 0b0001] if last & 0b0001 == 0 else alphabet[last & ~0b0001]  # fmt: skip
    respelled = signature[:-1] + twin
    assert b64d(respelled) == b64d(signature)  # same bytes, other spelling
    refused(f"{payload}.{respelled}.{kid}", "malformed")


@pytest.mark.parametrize("payload", [b"not json", b"{", b"[1, 2]", b'"a string"', b"\xff\xfe"])
def test_signed_but_not_a_json_object_is_malformed(payload: bytes) -> None:
    refused(sign_raw(payload), "malformed")


def test_unsigned_bad_json_is_a_bad_signature() -> None:
    _, good = issue()
    _, signature, kid = good.split(".")
    refused(f"{b64e(b'not json')}.{signature}.{kid}", "bad_signature")


def _tamper(header: str, change) -> str:  # noqa: ANN001
    payload, signature, kid = header.split(".")
    data = json.loads(b64d(payload))
    change(data)
    return f"{b64e(json.dumps(data).encode())}.{signature}.{kid}"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["actor"].update(role="owner"),
        lambda d: d["actor"].update(is_platform_admin=True),
        lambda d: d.update(org_id=str(OTHER_ORG)),
        lambda d: d.update(
            org_id=str(OTHER_ORG), actor={**d["actor"], "organization_id": str(OTHER_ORG)}
        ),
        lambda d: d.update(subject="vge.cmd.payments.refund"),
        lambda d: d.update(expires_at="2099-01-01T00:00:00Z"),
        lambda d: d.update(message_id="replayed"),
        lambda d: None,  # same content, different bytes (json.dumps spacing): still refused
    ],
    ids=["role", "platform_admin", "org", "actor_and_org", "subject", "expiry", "message_id",
         "reserialised"],
)  # fmt: skip
def test_tampered_payload_with_old_signature(change) -> None:  # noqa: ANN001
    _, header = issue()
    refused(_tamper(header, change), "bad_signature")


def test_forged_with_another_key_but_the_trusted_key_id() -> None:
    # An attacker signs their own context and claims the trusted key's id.
    owner = Actor(user_id="mallory", organization_id=ORG, role=Role.OWNER, type=ActorType.USER)
    _, forged = issue(owner, key=OTHER)
    payload, signature, _ = forged.split(".")
    refused(f"{payload}.{signature}.{signer().key_id}", "bad_signature")


def test_signature_moved_to_another_payload() -> None:
    _, first = issue()
    _, second = signer().issue(VIEWER, ORG, "vge.cmd.payments.refund", "c")
    refused(f"{first.split('.')[0]}.{second.split('.')[1]}.{signer().key_id}", "bad_signature")


def test_unknown_key() -> None:
    _, header = issue(key=OTHER)
    error = refused(header, "unknown_key")
    assert key_id(OTHER.public_key()) in error.detail


def test_expired() -> None:
    ctx, header = issue()
    assert verifier(at=ctx.expires_at - timedelta(microseconds=1)).verify(header, SUBJECT) == ctx
    refused(header, "expired", v=verifier(at=ctx.expires_at))  # expires_at <= now
    refused(header, "expired", v=verifier(at=ctx.expires_at + timedelta(days=1)))


def test_wrong_subject() -> None:
    _, header = issue()
    refused(header, "wrong_subject", subject="vge.cmd.payments.refund")
    refused(header, "wrong_subject", subject=SUBJECT + ".x")


def _ctx_json(**overrides: object) -> dict:
    data = {
        "actor": VIEWER.model_dump(mode="json"),
        "org_id": str(ORG),
        "message_id": "m-1",
        "subject": SUBJECT,
        "expires_at": (NOW + timedelta(seconds=30)).isoformat(),
        "correlation_id": "c",
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    "data",
    [
        _ctx_json(org_id=str(OTHER_ORG)),  # an org user acting in another tenant
        _ctx_json(org_id=None),  # a non-platform actor without a tenant
        _ctx_json(actor={"user_id": "d", "organization_id": str(ORG), "role": "staff",
                         "type": "device"}),
        _ctx_json(actor={"user_id": "u", "organization_id": None, "role": None, "type": "user"}),
        _ctx_json(actor={**VIEWER.model_dump(mode="json"), "role": "god"}),
        _ctx_json(actor={**VIEWER.model_dump(mode="json"), "scopes": ["*"]}),
        _ctx_json(expires_at="2030-01-01T12:00:30"),  # naive time
        _ctx_json(subject=""),
        _ctx_json(correlation_id=""),
        _ctx_json(extra="field"),
        {k: v for k, v in _ctx_json().items() if k != "actor"},
    ],
    ids=["other_org", "no_org", "device_role", "user_no_org", "bad_role", "actor_extra", "naive",
         "empty_subject", "empty_correlation", "extra", "no_actor"],
)  # fmt: skip
def test_signed_but_invalid_context(data: dict) -> None:
    # Even the gateway's own signature cannot make an invalid actor/context valid.
    refused(sign_raw(json.dumps(data).encode()), "invalid_actor")


def test_signed_valid_raw_context_is_accepted() -> None:
    ctx = verifier().verify(sign_raw(json.dumps(_ctx_json()).encode()), SUBJECT)
    assert ctx.actor == VIEWER and ctx.message_id == "m-1"


def test_error_reply_carries_the_reason() -> None:
    reply = refused("garbage", "malformed").to_reply("corr-9")
    assert reply.error is ErrorCode.UNAUTHENTICATED
    assert reply.extra == {"reason": "malformed"} and reply.correlation_id == "corr-9"


# --- rotation and keys ------------------------------------------------------------------------


def test_rotation_two_trusted_keys_both_verify() -> None:
    both = verifier(TRUSTED, OTHER)
    assert both.key_ids == {signer(TRUSTED).key_id, signer(OTHER).key_id}
    for key in (TRUSTED, OTHER):
        ctx, header = issue(key=key)
        assert both.verify(header, SUBJECT) == ctx
    # After the old key is dropped, its contexts are refused.
    _, old = issue(key=TRUSTED)
    refused(old, "unknown_key", v=verifier(OTHER))


def test_key_helpers_round_trip() -> None:
    private_b64, public_b64 = generate_key_pair()
    assert len(base64.b64decode(private_b64)) == 32 and len(base64.b64decode(public_b64)) == 32
    private = load_private_key(private_b64)
    _, spare_public = generate_key_pair()
    keys = load_public_keys(f" {spare_public} , {public_b64},,")
    assert len(keys) == 2
    ctx, header = ContextSigner(private).issue(VIEWER, ORG, SUBJECT, "c")
    assert ContextVerifier(keys).verify(header, SUBJECT) == ctx
    assert key_id(keys[1]) == ContextSigner(private).key_id


def test_key_helpers_accept_base64url_spelling() -> None:
    private_b64, public_b64 = generate_key_pair()
    urlsafe = public_b64.replace("+", "-").replace("/", "_")
    expected = key_id(load_private_key(private_b64).public_key())
    assert key_id(load_public_keys(urlsafe)[0]) == expected


@pytest.mark.parametrize(
    "bad",
    ["not base64!", base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 64).decode()],
)
def test_invalid_keys_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        load_private_key(bad)
    with pytest.raises(ValueError):
        load_public_keys(f"{generate_key_pair()[1]},{bad}")


def test_verifier_needs_a_key() -> None:
    assert load_public_keys("") == [] and load_public_keys(" , ") == []
    with pytest.raises(ValueError):
        ContextVerifier([])


def test_default_clock_is_real_time() -> None:
    real_signer = ContextSigner(TRUSTED)
    ctx, header = real_signer.issue(VIEWER, ORG, SUBJECT, "c", ttl_seconds=60)
    assert ContextVerifier([TRUSTED.public_key()]).verify(header, SUBJECT) == ctx


# --- the model --------------------------------------------------------------------------------


def make(actor: Actor = VIEWER, org_id: UUID | None = ORG, **kw: object) -> CommandContext:
    fields: dict = {"subject": SUBJECT, "expires_at": NOW + timedelta(seconds=30)}
    fields.update(kw, correlation_id="c")
    return CommandContext(actor=actor, org_id=org_id, **fields)


def test_model_rules() -> None:
    with pytest.raises(ValidationError, match="own organization"):
        make(org_id=OTHER_ORG)
    with pytest.raises(ValidationError, match="platform actor"):
        make(org_id=None)
    with pytest.raises(ValidationError, match="timezone"):
        make(expires_at=datetime(2030, 1, 1))
    sast = timezone(timedelta(hours=2))
    ctx = make(expires_at=(NOW + timedelta(seconds=30)).astimezone(sast))
    assert ctx.expires_at.tzinfo is UTC and ctx.expires_at == NOW + timedelta(seconds=30)
    with pytest.raises(ValidationError):
        ctx.org_id = OTHER_ORG  # type: ignore[misc]
    # A system job without an organization may act in the tenant it names.
    assert make(Actor.system("relay")).org_id == ORG
    # Platform staff may be sent into another tenant; the policy table keeps them to reads.
    staff = Actor(
        user_id="s", organization_id=ORG, role=Role.STAFF, type=ActorType.USER,
        is_platform_staff=True,
    )  # fmt: skip
    assert make(staff, OTHER_ORG).org_id == OTHER_ORG


# --- property ---------------------------------------------------------------------------------

_CTX, _HEADER = issue()
_VERIFIER = verifier()
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ !\x00é"


@given(index=st.integers(min_value=0, max_value=len(_HEADER) - 1), char=st.sampled_from(_ALPHABET))
def test_any_changed_character_is_refused(index: int, char: str) -> None:
    """Changing any one character anywhere in the header (payload, signature or key id) fails."""
    if _HEADER[index] == char:
        return
    mutated = _HEADER[:index] + char + _HEADER[index + 1 :]
    with pytest.raises(Unauthenticated):
        _VERIFIER.verify(mutated, SUBJECT)


@given(data=st.data())
def test_any_changed_payload_byte_is_refused(data: st.DataObject) -> None:
    """Changing any byte of the decoded payload (kept validly encoded) fails the signature."""
    payload_b64, signature, kid = _HEADER.split(".")
    payload = bytearray(b64d(payload_b64))
    index = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    value = data.draw(st.integers(min_value=0, max_value=255).filter(lambda b: b != payload[index]))
    payload[index] = value
    with pytest.raises(Unauthenticated) as info:
        _VERIFIER.verify(f"{b64e(bytes(payload))}.{signature}.{kid}", SUBJECT)
    assert info.value.extra["reason"] == "bad_signature"


@given(cut=st.integers(min_value=1, max_value=len(_HEADER) - 1))
def test_any_truncation_is_refused(cut: int) -> None:
    with pytest.raises(Unauthenticated):
        _VERIFIER.verify(_HEADER[:cut], SUBJECT)
