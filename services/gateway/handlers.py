"""The gateway's use cases: who a request is (authentication), and the credentials it manages.

Thin on purpose: token rules live in ``domain``, storage in ``adapters``; the HTTP routes in
``api`` only parse a request and call these.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from libs.actor import Actor, Role
from libs.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from libs.policy import Action, Resource, authorize
from services.gateway.adapters.jwt import JwtVerifier
from services.gateway.adapters.nats_feeds import RevocationBroadcast
from services.gateway.adapters.postgres import ApiKeyRecord, DeviceRecord, GatewayStore
from services.gateway.domain.credentials import (
    TokenKind,
    api_key_actor,
    device_actor,
    looks_like_jwt,
    may_grant,
    parse_token,
)

__all__ = ["Principal", "Authenticator", "CredentialAdmin"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the actor, the credential it used, and a device's binding."""

    actor: Actor
    credential_id: str
    device: DeviceRecord | None = None

    def tenant(self, requested: str | None = None) -> UUID:
        """The tenant this request acts in.

        An ordinary actor always acts in its own organization. A platform actor names the tenant
        with the ``Vge-Organization-Id`` header (the policy then limits what it may do there).
        """
        actor = self.actor
        if actor.is_platform_admin or actor.is_platform_staff:
            if requested:
                try:
                    return UUID(requested)
                except ValueError:
                    raise InvalidInput("Vge-Organization-Id is not a UUID") from None
            if actor.organization_id is not None:
                return actor.organization_id
            raise InvalidInput("a platform actor names the tenant with Vge-Organization-Id")
        assert actor.organization_id is not None  # the Actor model guarantees it
        if requested and requested.lower() != str(actor.organization_id):
            # another tenant is not there for this actor: no existence leak, no silent switch
            raise NotFound("organization not found")
        return actor.organization_id


class Authenticator:
    """Bearer credential -> ``Principal``, with a short in-process cache of verified credentials.

    A cache hit costs no I/O, which keeps the scan path fast; a revocation removes the entry on
    every replica at once (``RevocationBroadcast``) and ``ttl`` bounds a missed broadcast.
    """

    def __init__(self, store: GatewayStore, jwts: JwtVerifier, *, ttl: float) -> None:
        self._store = store
        self._jwts = jwts
        self._ttl = ttl
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization: Bearer ...`` header, else ``Unauthenticated``."""
        if not authorization:
            raise Unauthenticated("no credential: send Authorization: Bearer <token>", reason="missing")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("use Authorization: Bearer <token>", reason="malformed")
        if looks_like_jwt(token):
            actor = await self._jwts.verify(token)
            return Principal(actor, f"user:{actor.user_id}")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        principal = await self._verify(token)
        if len(self._cache) > 100_000:  # bound memory under a flood of distinct tokens
            self._cache.clear()
        self._cache[digest] = (principal, time.monotonic() + self._ttl)
        return principal

    async def _verify(self, token: str) -> Principal:
        parsed = parse_token(token)
        if parsed.kind is TokenKind.API_KEY:
            key = await self._store.verify_api_key(parsed)
            actor = api_key_actor(key.organization_id, key.api_key_id, key.role)
            return Principal(actor, str(key.api_key_id))
        if parsed.kind is TokenKind.DEVICE:
            device = await self._store.verify_device(parsed)
            return Principal(device_actor(device.organization_id, device.device_id),
                             str(device.device_id), device)  # fmt: skip
        raise Unauthenticated("an enrolment token is only good for /v1/devices/enrol",
                              reason="enrolment_token")  # fmt: skip

    async def forget_all(self) -> None:
        """Drop every cached principal: a revocation broadcast may have been missed (this
        replica's NATS connection was away)."""
        self._cache.clear()

    def forget(self, credential_id: str) -> None:
        """Drop every cached principal of ``credential_id`` (it was revoked or rolled)."""
        for digest, (principal, _) in list(self._cache.items()):
            if principal.credential_id == credential_id:
                self._cache.pop(digest, None)


class CredentialAdmin:
    """Devices and API keys: register, enrol, roll, revoke, list (design §7)."""

    def __init__(self, store: GatewayStore, revocations: RevocationBroadcast, *,
                 enrolment_ttl: timedelta) -> None:  # fmt: skip
        self._store = store
        self._revocations = revocations
        self._enrolment_ttl = enrolment_ttl

    async def register_device(self, p: Principal, org: UUID, name: str, event_id: UUID | None,
                              gate: str | None, correlation_id: str
                              ) -> tuple[DeviceRecord, str, datetime]:  # fmt: skip
        """A new device and its single-use enrolment token."""
        authorize(p.actor, Action.DEVICE_MANAGE, Resource("device", org))
        return await self._store.register_device(org, name, event_id, gate, self._enrolment_ttl,
                                                 p.actor, correlation_id)  # fmt: skip

    async def enrol(self, enrolment_token: str, correlation_id: str) -> tuple[DeviceRecord, str]:
        """Exchange an enrolment token (once) for the device's long-lived token."""
        return await self._store.enrol_device(parse_token(enrolment_token, TokenKind.ENROLMENT),
                                              correlation_id)  # fmt: skip

    async def roll_device_token(self, p: Principal, org: UUID, device_id: UUID,
                                correlation_id: str) -> tuple[DeviceRecord, str]:  # fmt: skip
        """A new token for a device: by the device itself, or by an owner/admin."""
        if p.device is None or p.device.device_id != device_id:
            authorize(p.actor, Action.DEVICE_MANAGE, Resource("device", org, str(device_id)))
        record, token = await self._store.roll_device_token(org, device_id, p.actor, correlation_id)
        await self._revocations.announce(str(device_id))
        return record, token

    async def revoke_device(self, p: Principal, org: UUID, device_id: UUID, correlation_id: str
                            ) -> DeviceRecord:  # fmt: skip
        """Revoke a device; it is refused at once on every gateway replica."""
        authorize(p.actor, Action.DEVICE_MANAGE, Resource("device", org, str(device_id)))
        record = await self._store.revoke_device(org, device_id, p.actor, correlation_id)
        await self._revocations.announce(str(device_id))
        return record

    async def list_devices(self, p: Principal, org: UUID) -> list[DeviceRecord]:
        """The tenant's devices."""
        authorize(p.actor, Action.DEVICE_MANAGE, Resource("device", org))
        return await self._store.list_devices(org)

    async def create_api_key(self, p: Principal, org: UUID, name: str, role: Role | None,
                             correlation_id: str) -> tuple[ApiKeyRecord, str]:  # fmt: skip
        """Mint an API key no more powerful than its minter."""
        authorize(p.actor, Action.API_KEY_MANAGE, Resource("api_key", org))
        may_grant(p.actor, role)
        return await self._store.create_api_key(org, name, role, p.actor, correlation_id)

    async def revoke_api_key(self, p: Principal, org: UUID, api_key_id: UUID, correlation_id: str
                             ) -> ApiKeyRecord:  # fmt: skip
        """Revoke an API key; it is refused at once on every gateway replica."""
        authorize(p.actor, Action.API_KEY_MANAGE, Resource("api_key", org, str(api_key_id)))
        if p.credential_id == str(api_key_id) and p.actor.role is Role.OWNER:
            # an owner key may not saw off the branch it sits on by accident
            raise Forbidden("an owner key cannot revoke itself; use another owner credential")
        record = await self._store.revoke_api_key(org, api_key_id, p.actor, correlation_id)
        await self._revocations.announce(str(api_key_id))
        return record

    async def list_api_keys(self, p: Principal, org: UUID) -> list[ApiKeyRecord]:
        """The tenant's API keys (never their secrets)."""
        authorize(p.actor, Action.API_KEY_MANAGE, Resource("api_key", org))
        return await self._store.list_api_keys(org)


