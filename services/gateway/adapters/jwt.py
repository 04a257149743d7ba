"""User JWTs from a configured issuer (design §3): HS256 with a shared key for local runs, RS256
with a PEM key or the issuer's JWKS in production. PyJWT does the cryptography and claim checks.

Claims the gateway reads (the issuer's token must carry them):

- ``sub``: the user id;
- ``org_id``: the user's organization (absent only for platform staff and admins);
- ``role``: owner | admin | staff | viewer | scanner_only (in ``org_id``);
- ``platform_admin`` / ``platform_staff``: booleans, default false.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import jwt
from pydantic import ValidationError

from libs.actor import Actor, ActorType
from libs.errors import Unauthenticated
from libs.settings import Settings

__all__ = ["JwtVerifier", "actor_from_claims"]


def actor_from_claims(claims: dict[str, Any]) -> Actor:
    """The actor of a verified token's claims; ``Unauthenticated`` if they do not make one."""
    try:
        org = claims.get("org_id")
        return Actor(
            user_id=str(claims["sub"]),
            organization_id=UUID(str(org)) if org else None,
            role=claims.get("role"),
            is_platform_admin=bool(claims.get("platform_admin", False)),
            is_platform_staff=bool(claims.get("platform_staff", False)),
            type=ActorType.USER,
        )
    except (KeyError, ValueError, ValidationError):
        raise Unauthenticated("token claims do not describe a user", reason="bad_claims") from None


class JwtVerifier:
    """Verifies user JWTs; refuses every JWT when no issuer is configured."""

    def __init__(self, settings: Settings) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._key: Any = None
        self._jwks: jwt.PyJWKClient | None = None
        if settings.jwt_hs256_secret:
            self._algorithms, self._key = ["HS256"], settings.jwt_hs256_secret
        elif settings.jwt_public_key:
            self._algorithms, self._key = ["RS256"], settings.jwt_public_key
        elif settings.jwt_jwks_url:
            self._algorithms = ["RS256"]
            self._jwks = jwt.PyJWKClient(settings.jwt_jwks_url, cache_keys=True, lifespan=300)
        else:
            self._algorithms = []

    @property
    def enabled(self) -> bool:
        """Whether user JWTs are accepted at all."""
        return bool(self._issuer and self._algorithms)

    async def verify(self, token: str) -> Actor:
        """The actor of a valid token, else ``Unauthenticated`` (expired, bad signature, ...)."""
        if not self.enabled:
            raise Unauthenticated("user tokens are not accepted here", reason="no_issuer")
        try:
            key = self._key
            if self._jwks is not None:
                # PyJWKClient fetches with urllib (blocking): keep it off the event loop
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            claims = jwt.decode(
                token, key, algorithms=self._algorithms, issuer=self._issuer,
                audience=self._audience, options={"require": ["exp", "sub", "iss"],
                                                  "verify_aud": self._audience is not None},
            )  # fmt: skip
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="expired") from None
        except (jwt.PyJWTError, ValueError):
            raise Unauthenticated("token is not valid", reason="bad_token") from None
        return actor_from_claims(claims)
