"""Credential tokens and the actor each credential acts as (design §3). Pure: no I/O.

A token is ``vge_<kind>_<org hex><id hex>_<secret>``: it names its tenant and record, so the
gateway looks it up with an ordinary tenant-scoped read, and carries a 256-bit secret of which
only the sha256 digest is stored. The kinds: ``ak`` API key, ``dt`` device token, ``et``
single-use device enrolment token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from uuid import UUID

from libs.actor import Actor, ActorType, Role
from libs.errors import Forbidden, Unauthenticated

__all__ = [
    "TokenKind",
    "ParsedToken",
    "mint_token",
    "parse_token",
    "secret_digest",
    "secret_matches",
    "api_key_actor",
    "device_actor",
    "may_grant",
    "looks_like_jwt",
]

_TOKEN = re.compile(r"^vge_(ak|dt|et)_([0-9a-f]{32})([0-9a-f]{32})_([A-Za-z0-9_-]{43})$")

# Who may mint a key of which role: nobody mints a key more powerful than themselves.
_RANK = {Role.SCANNER_ONLY: 0, Role.VIEWER: 0, Role.STAFF: 1, Role.ADMIN: 2, Role.OWNER: 3}


class TokenKind(StrEnum):
    """What a token is."""

    API_KEY = "ak"
    DEVICE = "dt"
    ENROLMENT = "et"


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A well-formed token: its kind, tenant, record id and secret (not yet verified)."""

    kind: TokenKind
    organization_id: UUID
    credential_id: UUID
    secret: str


def mint_token(kind: TokenKind, organization_id: UUID, credential_id: UUID) -> tuple[str, bytes]:
    """A new token and the digest to store for it. The token is shown once, never stored."""
    secret = secrets.token_urlsafe(32)  # 43 characters
    token = f"vge_{kind.value}_{organization_id.hex}{credential_id.hex}_{secret}"
    return token, secret_digest(secret)


def parse_token(token: str, expected: TokenKind | None = None) -> ParsedToken:
    """Split a token; ``Unauthenticated`` if it is not one of ours (or not of ``expected`` kind)."""
    match = _TOKEN.match(token)
    if match is None or (expected is not None and match.group(1) != expected.value):
        raise Unauthenticated("credential is not valid", reason="malformed")
    kind, org, cred, secret = match.groups()
    return ParsedToken(TokenKind(kind), UUID(hex=org), UUID(hex=cred), secret)


def secret_digest(secret: str) -> bytes:
    """What is stored for a secret."""
    return hashlib.sha256(secret.encode()).digest()


def secret_matches(secret: str, digest: bytes | None) -> bool:
    """Constant-time check of a presented secret against the stored digest."""
    return digest is not None and hmac.compare_digest(secret_digest(secret), bytes(digest))


def api_key_actor(organization_id: UUID, api_key_id: UUID, role: Role | None) -> Actor:
    """The actor an API key acts as.

    Design §3 gives API-key actors no role, and the policy a fixed integration reach for them.
    A key minted *with* a role (``POST /v1/api-keys {role}``, the owner key of ``vge tenant
    create``) is a service account: it acts as a user with that role, its ``user_id`` naming
    the key, so the audit log still says which key did it.
    """
    if role is None:
        return Actor(user_id=f"api_key:{api_key_id}", organization_id=organization_id,
                     role=None, type=ActorType.API_KEY)  # fmt: skip
    return Actor(user_id=f"api_key:{api_key_id}", organization_id=organization_id,
                 role=role, type=ActorType.USER)  # fmt: skip


def device_actor(organization_id: UUID, device_id: UUID) -> Actor:
    """The actor a gate device acts as."""
    return Actor(user_id=f"device:{device_id}", organization_id=organization_id, role=None,
                 type=ActorType.DEVICE)  # fmt: skip


def may_grant(granter: Actor, role: Role | None) -> None:
    """Refuse minting a key that could do more than the actor minting it (``Forbidden``)."""
    if granter.is_platform_admin or granter.type is ActorType.SYSTEM:
        return
    mine = _RANK.get(granter.role) if granter.role is not None else None
    # a role-less integration key is below staff: it cannot manage anything
    wanted = _RANK[role] if role is not None else 0
    if mine is None or wanted > mine:
        raise Forbidden(f"may not mint a key with role {role.value if role else 'none'}",
                        action="api_key.manage")  # fmt: skip


def looks_like_jwt(token: str) -> bool:
    """A JWT is three base64url parts; ours start with ``vge_``."""
    return token.count(".") == 2 and not token.startswith("vge_")
