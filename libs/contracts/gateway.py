"""Events of the gateway: organizations and the credentials it issues (design §1, §4.3).

The gateway owns organizations, API keys and devices; every change to them is an event through
its outbox, so the audit log records who minted or revoked which credential. No event carries a
secret: a credential's secret exists only in the one response that shows it.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar
from uuid import UUID

from pydantic import Field

from libs.actor import Role
from libs.contracts import EventData

__all__ = [
    "OrganizationCreated",
    "ApiKeyCreated",
    "ApiKeyRevoked",
    "DeviceRegistered",
    "DeviceEnrolled",
    "DeviceTokenRolled",
    "DeviceRevoked",
    "OrganizationReadByPlatform",
]


class _GatewayEvent(EventData):
    service: ClassVar[str] = "gateway"


class OrganizationCreated(_GatewayEvent):
    """A tenant was created (``vge tenant create``)."""

    event_type: ClassVar[str] = "organization.created"

    organization_id: UUID
    name: str


class ApiKeyCreated(_GatewayEvent):
    """An API key was minted; ``role`` None is an integration key with the fixed API-key reach."""

    event_type: ClassVar[str] = "api_key.created"

    api_key_id: UUID
    name: str
    role: Role | None


class ApiKeyRevoked(_GatewayEvent):
    """An API key was revoked: it is refused from now on."""

    event_type: ClassVar[str] = "api_key.revoked"

    api_key_id: UUID
    revoked_at: datetime


class DeviceRegistered(_GatewayEvent):
    """A gate device was registered and a single-use enrolment token issued for it."""

    event_type: ClassVar[str] = "device.registered"

    device_id: UUID
    name: str
    event_id: UUID | None = Field(default=None, description="The one event it may scan for.")
    gate: str | None = None
    enrolment_expires_at: datetime


class DeviceEnrolled(_GatewayEvent):
    """A device exchanged its enrolment token for its long-lived device token."""

    event_type: ClassVar[str] = "device.enrolled"

    device_id: UUID


class DeviceTokenRolled(_GatewayEvent):
    """A device's token was replaced; the previous one is refused from now on."""

    event_type: ClassVar[str] = "device.token_rolled"

    device_id: UUID


class DeviceRevoked(_GatewayEvent):
    """A device was revoked: its token (and any open enrolment) is refused from now on."""

    event_type: ClassVar[str] = "device.revoked"

    device_id: UUID
    revoked_at: datetime


class OrganizationReadByPlatform(_GatewayEvent):
    """A platform actor (admin or staff) read a tenant's data through the API (design §4: a
    read across tenants is itself audited). Recorded before the read is served: no record, no
    read. The tenant's own audit log shows it."""

    event_type: ClassVar[str] = "organization.read_by_platform"

    organization_id: UUID
    method: str
    path: str
    query: str = Field(default="", description="the request's query string, as sent")
