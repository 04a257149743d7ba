"""The gateway's PostgreSQL store: organizations, API keys, devices, enrolments, and stored
responses for Idempotency-Key replays. Every call is one tenant-scoped transaction; every
change writes its event to the outbox in that same transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable
from uuid import UUID

import asyncpg

from libs.actor import Actor, Role
from libs.contracts import EventData
from libs.contracts.gateway import (
    ApiKeyCreated,
    ApiKeyRevoked,
    DeviceEnrolled,
    DeviceRegistered,
    DeviceRevoked,
    DeviceTokenRolled,
    OrganizationCreated,
    OrganizationReadByPlatform,
)
from libs.db import tenant_transaction
from libs.envelope import Envelope, new_id, utcnow
from libs.errors import NotFound, Unauthenticated
from libs.outbox import add_events
from services.gateway.domain.credentials import (
    ParsedToken,
    TokenKind,
    device_actor,
    mint_token,
    secret_matches,
)
from services.gateway.domain.idempotency import Claimed, InProgress, Mismatch, Replay

__all__ = ["GatewayStore", "ApiKeyRecord", "DeviceRecord", "SERVICE"]

SERVICE = "gateway"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A live API key."""

    organization_id: UUID
    api_key_id: UUID
    name: str
    role: Role | None
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A gate device."""

    organization_id: UUID
    device_id: UUID
    name: str
    event_id: UUID | None
    gate: str | None
    enrolled_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


def _device(row: asyncpg.Record) -> DeviceRecord:
    return DeviceRecord(row["organization_id"], row["id"], row["name"], row["event_id"],
                        row["gate"], row["enrolled_at"], row["revoked_at"], row["created_at"])  # fmt: skip


def _api_key(row: asyncpg.Record) -> ApiKeyRecord:
    role = Role(row["role"]) if row["role"] else None
    return ApiKeyRecord(row["organization_id"], row["id"], row["name"], role, row["created_at"],
                        row["revoked_at"])  # fmt: skip


_REFUSED = "credential is not valid"


class GatewayStore:
    """Credentials and idempotency records in the gateway's schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def _events(self, conn: asyncpg.Connection, events: list[Envelope]) -> None:
        await add_events(conn, SERVICE, events)

    # -- organizations -----------------------------------------------------------------------

    async def create_organization(self, name: str, actor: Actor, correlation_id: str
                                  ) -> tuple[UUID, str]:  # fmt: skip
        """A new tenant and its first owner API key; returns (organization id, the key)."""
        org = new_id()
        async with tenant_transaction(self._pool, org) as conn:
            await conn.execute(
                "INSERT INTO organizations (organization_id, name) VALUES ($1, $2)", org, name
            )
            await self._events(conn, [OrganizationCreated(organization_id=org, name=name).envelope(
                org, actor, correlation_id)])  # fmt: skip
            key = await self._insert_api_key(conn, org, "owner key", Role.OWNER, actor,
                                             correlation_id)  # fmt: skip
        return org, key[1]

    async def record_platform_read(self, org: UUID, actor: Actor, method: str, path: str,
                                   query: str, correlation_id: str) -> None:
        """Queue the audit event of a platform actor's read of ``org``'s data, committed
        before the read is served; ``NotFound`` if there is no such organization."""
        event = OrganizationReadByPlatform(organization_id=org, method=method, path=path,
                                           query=query)  # fmt: skip
        async with tenant_transaction(self._pool, org) as conn:
            if await conn.fetchval("SELECT 1 FROM organizations WHERE organization_id = $1", org) is None:
                raise NotFound("organization not found")
            await self._events(conn, [event.envelope(org, actor, correlation_id)])

    # -- API keys ----------------------------------------------------------------------------

    async def _insert_api_key(self, conn: asyncpg.Connection, org: UUID, name: str,
                              role: Role | None, actor: Actor, correlation_id: str
                              ) -> tuple[ApiKeyRecord, str]:  # fmt: skip
        key_id = new_id()
        token, digest = mint_token(TokenKind.API_KEY, org, key_id)
        row = await conn.fetchrow(
            "INSERT INTO api_keys (organization_id, id, name, role, secret_hash, created_by) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            org, key_id, name, role.value if role else None, digest, actor.user_id,
        )
        await self._events(conn, [ApiKeyCreated(api_key_id=key_id, name=name, role=role).envelope(
            org, actor, correlation_id)])  # fmt: skip
        return _api_key(row), token

    async def create_api_key(self, org: UUID, name: str, role: Role | None, actor: Actor,
                             correlation_id: str) -> tuple[ApiKeyRecord, str]:  # fmt: skip
        """Mint an API key; returns the record and the key (shown once)."""
        async with tenant_transaction(self._pool, org) as conn:
            return await self._insert_api_key(conn, org, name, role, actor, correlation_id)

    async def revoke_api_key(self, org: UUID, key_id: UUID, actor: Actor, correlation_id: str
                             ) -> ApiKeyRecord:  # fmt: skip
        """Revoke a key (idempotent: revoking a revoked key returns it unchanged)."""
        row = await self._revoke(org, "api_keys", key_id, "api key not found", actor, correlation_id,
                                 lambda at: ApiKeyRevoked(api_key_id=key_id, revoked_at=at))  # fmt: skip
        return _api_key(row)

    async def list_api_keys(self, org: UUID) -> list[ApiKeyRecord]:
        """Every key of the tenant, newest first (never the secrets)."""
        async with tenant_transaction(self._pool, org, readonly=True) as conn:
            rows = await conn.fetch("SELECT * FROM api_keys ORDER BY created_at DESC")
        return [_api_key(r) for r in rows]

    async def verify_api_key(self, token: ParsedToken) -> ApiKeyRecord:
        """The live key the token belongs to, or ``Unauthenticated``."""
        async with tenant_transaction(self._pool, token.organization_id, readonly=True) as conn:
            row = await conn.fetchrow(
                "SELECT * FROM api_keys WHERE id = $1", token.credential_id
            )
        if row is None or not secret_matches(token.secret, row["secret_hash"]):
            raise Unauthenticated(_REFUSED, reason="unknown")
        if row["revoked_at"] is not None:
            raise Unauthenticated("credential was revoked", reason="revoked")
        return _api_key(row)

    # -- devices -----------------------------------------------------------------------------

    async def register_device(self, org: UUID, name: str, event_id: UUID | None, gate: str | None,
                              enrolment_ttl: timedelta, actor: Actor, correlation_id: str
                              ) -> tuple[DeviceRecord, str, datetime]:  # fmt: skip
        """A new device and its single-use enrolment token (shown once) with its expiry."""
        device_id, enrolment_id = new_id(), new_id()
        token, digest = mint_token(TokenKind.ENROLMENT, org, enrolment_id)
        expires_at = utcnow() + enrolment_ttl
        async with tenant_transaction(self._pool, org) as conn:
            row = await conn.fetchrow(
                "INSERT INTO devices (organization_id, id, name, event_id, gate, created_by) "
                "VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
                org, device_id, name, event_id, gate, actor.user_id,
            )
            await conn.execute(
                "INSERT INTO device_enrolments (organization_id, id, device_id, secret_hash, "
                "expires_at) VALUES ($1, $2, $3, $4, $5)",
                org, enrolment_id, device_id, digest, expires_at,
            )
            await self._events(conn, [DeviceRegistered(
                device_id=device_id, name=name, event_id=event_id, gate=gate,
                enrolment_expires_at=expires_at).envelope(org, actor, correlation_id)])  # fmt: skip
        return _device(row), token, expires_at

    async def enrol_device(self, token: ParsedToken, correlation_id: str) -> tuple[DeviceRecord, str]:
        """Exchange an enrolment token once for the device's long-lived token.

        The conditional update makes the exchange single-use also when two requests race.
        """
        org = token.organization_id
        async with tenant_transaction(self._pool, org) as conn:
            enrolment = await conn.fetchrow(
                "SELECT e.*, d.revoked_at AS device_revoked_at FROM device_enrolments e "
                "JOIN devices d ON d.organization_id = e.organization_id AND d.id = e.device_id "
                "WHERE e.id = $1", token.credential_id,
            )
            if enrolment is None or not secret_matches(token.secret, enrolment["secret_hash"]):
                raise Unauthenticated("enrolment token is not valid", reason="unknown")
            used = await conn.fetchval(
                "UPDATE device_enrolments SET used_at = now() WHERE id = $1 AND used_at IS NULL "
                "AND expires_at > now() RETURNING 1", token.credential_id,
            )
            if used is None or enrolment["device_revoked_at"] is not None:
                raise Unauthenticated("enrolment token was used, has expired or was revoked",
                                      reason="enrolment_spent")  # fmt: skip
            device_token, digest = mint_token(TokenKind.DEVICE, org, enrolment["device_id"])
            row = await conn.fetchrow(
                "UPDATE devices SET token_hash = $2, enrolled_at = now() WHERE id = $1 "
                "RETURNING *", enrolment["device_id"], digest,
            )
            await self._events(conn, [DeviceEnrolled(device_id=enrolment["device_id"]).envelope(
                org, device_actor(org, enrolment["device_id"]), correlation_id)])  # fmt: skip
        return _device(row), device_token

    async def roll_device_token(self, org: UUID, device_id: UUID, actor: Actor,
                                correlation_id: str) -> tuple[DeviceRecord, str]:  # fmt: skip
        """Replace a live device's token; the old one is refused from now on."""
        device_token, digest = mint_token(TokenKind.DEVICE, org, device_id)
        async with tenant_transaction(self._pool, org) as conn:
            row = await conn.fetchrow(
                "UPDATE devices SET token_hash = $2, token_rolled_at = now() WHERE id = $1 "
                "AND revoked_at IS NULL AND token_hash IS NOT NULL RETURNING *", device_id, digest,
            )
            if row is None:
                raise NotFound("device not found (or not enrolled, or revoked)")
            await self._events(conn, [DeviceTokenRolled(device_id=device_id).envelope(
                org, actor, correlation_id)])  # fmt: skip
        return _device(row), device_token

    async def revoke_device(self, org: UUID, device_id: UUID, actor: Actor, correlation_id: str
                            ) -> DeviceRecord:  # fmt: skip
        """Revoke a device (idempotent); its token and open enrolment are refused from now on."""
        row = await self._revoke(org, "devices", device_id, "device not found", actor, correlation_id,
                                 lambda at: DeviceRevoked(device_id=device_id, revoked_at=at))  # fmt: skip
        return _device(row)

    async def _revoke(self, org: UUID, table: str, record_id: UUID, not_found: str, actor: Actor,
                      correlation_id: str, revoked: Callable[[datetime], EventData]
                      ) -> asyncpg.Record:  # fmt: skip
        # ``table`` is one of this module's constants, never input
        async with tenant_transaction(self._pool, org) as conn:
            row = await conn.fetchrow(
                f"UPDATE {table} SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL "
                "RETURNING *", record_id,
            )
            if row is None:  # already revoked (or not there): no second event
                row = await conn.fetchrow(f"SELECT * FROM {table} WHERE id = $1", record_id)
                if row is None:
                    raise NotFound(not_found)
                return row
            await self._events(conn, [revoked(row["revoked_at"]).envelope(org, actor, correlation_id)])
        return row

    async def list_devices(self, org: UUID) -> list[DeviceRecord]:
        """Every device of the tenant, newest first."""
        async with tenant_transaction(self._pool, org, readonly=True) as conn:
            rows = await conn.fetch("SELECT * FROM devices ORDER BY created_at DESC")
        return [_device(r) for r in rows]

    async def verify_device(self, token: ParsedToken) -> DeviceRecord:
        """The live device the token belongs to, or ``Unauthenticated``."""
        async with tenant_transaction(self._pool, token.organization_id, readonly=True) as conn:
            row = await conn.fetchrow("SELECT * FROM devices WHERE id = $1", token.credential_id)
        if row is None or not secret_matches(token.secret, row["token_hash"]):
            raise Unauthenticated(_REFUSED, reason="unknown")
        if row["revoked_at"] is not None:
            raise Unauthenticated("device was revoked", reason="revoked")
        return _device(row)

    # -- idempotency -------------------------------------------------------------------------

    async def claim_idempotency_key(self, org: UUID, credential_id: str, key: str,
                                    fingerprint: str) -> Claimed | Replay | InProgress | Mismatch:  # fmt: skip
        """Claim ``key`` for this request, or say what the earlier request with it left."""
        async with tenant_transaction(self._pool, org) as conn:
            claimed = await conn.fetchval(
                "INSERT INTO idempotency_records (organization_id, credential_id, key, request_hash) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
                org, credential_id, key, fingerprint,
            )
            if claimed:
                return Claimed()
            row = await conn.fetchrow(
                "SELECT request_hash, status_code, body FROM idempotency_records "
                "WHERE credential_id = $1 AND key = $2", credential_id, key,
            )
        if row is None:  # released between our insert and select: the caller may retry
            return InProgress()
        if row["request_hash"] != fingerprint:
            return Mismatch()
        if row["status_code"] is None:
            return InProgress()
        return Replay(row["status_code"], row["body"])

    async def complete_idempotency_key(self, org: UUID, credential_id: str, key: str,
                                       status_code: int, body: Any) -> None:  # fmt: skip
        """Store the response the key replays from now on."""
        async with tenant_transaction(self._pool, org) as conn:
            await conn.execute(
                "UPDATE idempotency_records SET status_code = $3, body = $4, completed_at = now() "
                "WHERE credential_id = $1 AND key = $2", credential_id, key, status_code, body,
            )

    async def release_idempotency_key(self, org: UUID, credential_id: str, key: str) -> None:
        """Forget a claim whose outcome is unknown, so a retry does the work."""
        async with tenant_transaction(self._pool, org) as conn:
            await conn.execute(
                "DELETE FROM idempotency_records WHERE credential_id = $1 AND key = $2 "
                "AND status_code IS NULL", credential_id, key,
            )
