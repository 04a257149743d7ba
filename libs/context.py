"""The signed command context (design §3): who acts, in which tenant, on which subject, until when.

The gateway builds the actor from a credential and signs a :class:`CommandContext` with its
Ed25519 key; every service verifies the header with :class:`ContextVerifier` before it looks at
anything else in a command, and answers ``unauthenticated`` when that fails.

Wire format of the ``Vge-Context`` header::

    base64url(context JSON) "." base64url(Ed25519 signature over those JSON bytes) "." key_id

base64url is unpadded. ``key_id`` is a fingerprint of the signing public key so a verifier that
trusts several keys (rotation) knows which one to try; it is only a hint, the signature still has
to verify with that key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Final, Literal
from uuid import UUID

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from libs.actor import Actor
from libs.envelope import new_id, utcnow
from libs.errors import Unauthenticated

__all__ = [
    "CONTEXT_HEADER",
    "MAX_HEADER_LENGTH",
    "RefusalReason",
    "CommandContext",
    "ContextSigner",
    "ContextVerifier",
    "generate_key_pair",
    "load_private_key",
    "load_public_keys",
    "key_id",
]

CONTEXT_HEADER: Final = "Vge-Context"

# A real context is well under 1 KiB; refusing huge headers before decoding bounds the work an
# unauthenticated sender can make a service do.
MAX_HEADER_LENGTH: Final = 8192

RefusalReason = Literal[
    "missing",
    "malformed",
    "unknown_key",
    "bad_signature",
    "expired",
    "wrong_subject",
    "invalid_actor",
]
"""The fixed vocabulary of ``Unauthenticated.extra["reason"]`` raised by the verifier."""

_KEY_ID_RE: Final = re.compile(r"^[0-9a-f]{16}$")
_B64URL_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_SIGNATURE_LENGTH: Final = 64  # Ed25519 signatures are always 64 bytes
_RAW_KEY_LENGTH: Final = 32  # Ed25519 private seeds and public keys are 32 bytes


class CommandContext(BaseModel):
    """What a command is allowed to claim about itself, as signed by the gateway.

    ``org_id`` is the tenant the command acts in; it is ``None`` only for a platform actor acting
    outside any tenant. An actor who belongs to an organization acts in that organization, except
    platform actors, whose cross-tenant reach the policy table then limits (admins: anything,
    platform staff: reads).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    actor: Actor
    org_id: UUID | None
    message_id: str = Field(default_factory=lambda: str(new_id()), min_length=1)
    subject: str = Field(min_length=1)
    expires_at: datetime
    correlation_id: str = Field(min_length=1)

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        # A naive time is ambiguous across hosts; refuse it rather than guess a zone.
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("expires_at must be timezone-aware")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _check_tenant(self) -> "CommandContext":
        actor = self.actor
        is_platform = actor.is_platform_admin or actor.is_platform_staff
        if self.org_id is None and not is_platform:
            raise ValueError("only a platform actor may act without a tenant")
        if (
            actor.organization_id is not None
            and self.org_id != actor.organization_id
            and not is_platform
        ):
            # The context can never move an ordinary actor into another tenant.
            raise ValueError("org_id must be the actor's own organization")
        return self

    def to_bytes(self) -> bytes:
        """The exact JSON bytes that are signed and sent."""
        return self.model_dump_json().encode()


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """Strict unpadded base64url: only the alphabet, and only the one canonical spelling.

    The stdlib decoder skips foreign characters and ignores the unused low bits of the last
    character, so several strings decode to the same bytes; we refuse all but the canonical one
    so any edit of the header is an error, never a silent no-op.
    """
    if not _B64URL_RE.match(text):
        raise ValueError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc
    if _b64e(raw) != text:
        raise ValueError("non-canonical base64url")
    return raw


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex chars of sha256 of its raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def generate_key_pair() -> tuple[str, str]:
    """A new Ed25519 key pair as ``(base64 raw private key, base64 raw public key)``.

    The format of ``VGE_CONTEXT_PRIVATE_KEY`` and ``VGE_CONTEXT_PUBLIC_KEYS``.
    """
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes_raw()
    raw_public = _raw_public(private.public_key())
    return base64.b64encode(raw_private).decode(), base64.b64encode(raw_public).decode()


def _decode_raw_key(b64: str, what: str) -> bytes:
    text = b64.strip()
    try:
        # Standard base64 (as generate_key_pair prints it); base64url is accepted too.
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc
    if len(raw) != _RAW_KEY_LENGTH:
        raise ValueError(f"{what} must be {_RAW_KEY_LENGTH} raw bytes, got {len(raw)}")
    return raw


def load_private_key(b64: str) -> Ed25519PrivateKey:
    """The gateway's signing key from base64 of its raw 32 bytes; ``ValueError`` if invalid."""
    return Ed25519PrivateKey.from_private_bytes(_decode_raw_key(b64, "context private key"))


def load_public_keys(csv_b64: str) -> list[Ed25519PublicKey]:
    """Trusted verification keys from comma-separated base64 raw keys (several during rotation).

    Blank entries are skipped; any invalid entry raises ``ValueError`` (a typo in a trusted key
    must stop the service at start, not silently distrust the gateway).
    """
    return [
        Ed25519PublicKey.from_public_bytes(_decode_raw_key(part, "context public key"))
        for part in csv_b64.split(",")
        if part.strip()
    ]


class ContextSigner:
    """Signs command contexts with the gateway's Ed25519 key."""

    def __init__(
        self, private_key: Ed25519PrivateKey, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        """``clock`` sets the time ``issue`` counts the expiry from (tests inject one)."""
        # libsodium signs (Ed25519 is deterministic: the same signature OpenSSL would make)
        self._signing_key = nacl.signing.SigningKey(private_key.private_bytes_raw())
        self._clock = clock
        self.key_id: str = key_id(private_key.public_key())

    def sign(self, ctx: CommandContext) -> str:
        """The ``Vge-Context`` header value for ``ctx``."""
        payload = ctx.to_bytes()
        signature = self._signing_key.sign(payload).signature
        return f"{_b64e(payload)}.{_b64e(signature)}.{self.key_id}"

    def issue(
        self,
        actor: Actor,
        org_id: UUID | None,
        subject: str,
        correlation_id: str,
        ttl_seconds: float = 30,
        message_id: str | None = None,
    ) -> tuple[CommandContext, str]:
        """Build a context for one command (new message id unless given) and sign it.

        Raises ``ValueError`` for a non-positive TTL and ``pydantic.ValidationError`` when the
        actor may not act in ``org_id``.
        """
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        fields: dict[str, object] = {
            "actor": actor,
            "org_id": org_id,
            "subject": subject,
            "correlation_id": correlation_id,
            "expires_at": self._clock() + timedelta(seconds=ttl_seconds),
        }
        if message_id is not None:
            fields["message_id"] = message_id
        ctx = CommandContext(**fields)  # type: ignore[arg-type]
        return ctx, self.sign(ctx)


def _refuse(reason: RefusalReason, detail: str) -> Unauthenticated:
    return Unauthenticated(detail, reason=reason)


class ContextVerifier:
    """Verifies ``Vge-Context`` headers against the trusted gateway keys.

    Every failure is ``libs.errors.Unauthenticated`` with ``extra["reason"]`` one of
    :data:`RefusalReason`.
    """

    def __init__(
        self,
        public_keys: Iterable[Ed25519PublicKey],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """Trust ``public_keys``; ``clock`` is injectable for tests. No keys is a config error."""
        # libsodium verifies in about 60% of OpenSSL's time, and every command pays it
        self._keys: dict[str, nacl.signing.VerifyKey] = {
            key_id(k): nacl.signing.VerifyKey(_raw_public(k)) for k in public_keys
        }
        if not self._keys:
            raise ValueError("a context verifier needs at least one trusted public key")
        self._clock = clock

    @property
    def key_ids(self) -> frozenset[str]:
        """Fingerprints of the trusted keys."""
        return frozenset(self._keys)

    def verify(self, header_value: str | None, subject: str) -> CommandContext:
        """The context of a command received on ``subject``, or ``Unauthenticated``.

        Order matters: the signature is checked before the payload is parsed, so nothing an
        unauthenticated sender wrote reaches the model.
        """
        if not header_value:
            raise _refuse("missing", f"no {CONTEXT_HEADER} header")
        if not isinstance(header_value, str) or len(header_value) > MAX_HEADER_LENGTH:
            raise _refuse("malformed", f"{CONTEXT_HEADER} header is not a valid context")
        parts = header_value.split(".")
        if len(parts) != 3:
            raise _refuse("malformed", f"{CONTEXT_HEADER} header must have three parts")
        payload_b64, signature_b64, kid = parts
        if not _KEY_ID_RE.match(kid):
            raise _refuse("malformed", f"{CONTEXT_HEADER} header has an invalid key id")
        try:
            payload = _b64d(payload_b64)
            signature = _b64d(signature_b64)
        except ValueError:
            raise _refuse("malformed", f"{CONTEXT_HEADER} header is not valid base64url") from None
        if len(signature) != _SIGNATURE_LENGTH:
            raise _refuse("malformed", f"{CONTEXT_HEADER} signature has the wrong length")

        public_key = self._keys.get(kid)
        if public_key is None:
            raise _refuse("unknown_key", f"context signed by an untrusted key ({kid})")
        try:
            public_key.verify(payload, signature)
        except nacl.exceptions.BadSignatureError:
            raise _refuse("bad_signature", "context signature does not verify") from None

        # Signed by the gateway: now parse. Unparseable JSON is still "malformed"; a well-formed
        # object that breaks the model's rules is an invalid actor/context.
        try:
            ctx = CommandContext.model_validate_json(payload)  # one parse on the hot path
        except ValidationError as exc:
            kinds = {e["type"] for e in exc.errors()}
            if kinds & {"json_invalid", "json_type", "model_type", "model_attributes_type"}:
                raise _refuse("malformed", "context payload is not a JSON object") from None
            where = ", ".join(".".join(str(p) for p in e["loc"]) or "context" for e in exc.errors())
            raise _refuse("invalid_actor", f"context is invalid ({where})") from None

        now = self._clock()
        if ctx.expires_at <= now:
            raise _refuse("expired", f"context expired at {ctx.expires_at.isoformat()}")
        if ctx.subject != subject:
            raise _refuse("wrong_subject", f"context was issued for subject {ctx.subject!r}")
        return ctx
