"""HTTP bodies of the public API (design §7) that are not a service's command as it is.

Most bodies are a command of ``libs.contracts`` minus the fields the gateway fills in itself
(from the credential, the path or the ``Idempotency-Key`` header), so the HTTP contract and the
NATS contract cannot drift apart. Replies are the services' reply models unchanged.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field, create_model

from libs.actor import Role
from libs.contracts import Command
from libs.contracts.payments import CompleteCheckout, CreateCheckout, CreateEvent
from libs.contracts.scanning import ScanTicket, SyncOfflineScans

__all__ = [
    "CreateEventBody", "CreateCheckoutBody", "CompleteCheckoutBody", "ScanBody", "ScanBatchBody",
    "RegisterDevice", "DeviceRegistration", "EnrolDevice", "DeviceEnrolment", "DeviceView",
    "DeviceList", "CreateApiKey", "ApiKeyIssued", "ApiKeyView", "ApiKeyList", "Problem",
]  # fmt: skip


def _body_of(command: type[Command], name: str, *, without: set[str]) -> type[Command]:
    """``command``'s fields except ``without`` (which the gateway fills in), as an HTTP body."""
    fields: dict[str, Any] = {
        k: (f.annotation, f) for k, f in command.model_fields.items() if k not in without
    }
    return create_model(name, __base__=Command, __doc__=command.__doc__, **fields)


CreateEventBody = _body_of(CreateEvent, "CreateEventBody", without={"idempotency_key"})
CreateCheckoutBody = _body_of(CreateCheckout, "CreateCheckoutBody", without={"idempotency_key"})
CompleteCheckoutBody = _body_of(
    CompleteCheckout, "CompleteCheckoutBody", without={"checkout_id", "idempotency_key"}
)
ScanBody = _body_of(ScanTicket, "ScanBody", without={"device_event_id"})
ScanBatchBody = _body_of(SyncOfflineScans, "ScanBatchBody", without={"device_event_id"})


class RegisterDevice(Command):
    """Register a gate device (``POST /v1/devices``; owner/admin)."""

    name: str = Field(min_length=1, max_length=200)
    event_id: UUID | None = Field(default=None, description="Bind it to one event.")
    gate: str | None = Field(default=None, min_length=1, max_length=64,
                             description="Default gate of its scans.")  # fmt: skip


class DeviceView(BaseModel):
    """A device as admins see it (never its token)."""

    device_id: UUID
    name: str
    event_id: UUID | None
    gate: str | None
    enrolled_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class DeviceRegistration(DeviceView):
    """``201 {device_id, enrolment_token}``: the token is shown once, also as a QR payload."""

    enrolment_token: str
    enrolment_expires_at: datetime
    enrolment_qr: str = Field(description="Text to render as a QR code for the scanner app.")


class EnrolDevice(Command):
    """Exchange a single-use enrolment token for the device token (``POST /v1/devices/enrol``)."""

    enrolment_token: str = Field(min_length=1, max_length=200)


class DeviceEnrolment(BaseModel):
    """``{device_id, device_token}``: the long-lived token, shown once."""

    device_id: UUID
    device_token: str
    event_id: UUID | None
    gate: str | None


class DeviceList(BaseModel):
    """The tenant's devices, newest first."""

    devices: list[DeviceView]


class CreateApiKey(Command):
    """Mint an API key (``POST /v1/api-keys``; owner/admin).

    With a ``role`` the key acts as a service account with that role; without one it is an
    integration key with the fixed API-key reach of the policy table (sell, read the books).
    """

    name: str = Field(min_length=1, max_length=200)
    role: Role | None = None


class ApiKeyView(BaseModel):
    """An API key as admins see it (never its secret)."""

    api_key_id: UUID
    name: str
    role: Role | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyIssued(ApiKeyView):
    """``201 {api_key_id, api_key}``: the key is shown once."""

    api_key: str


class ApiKeyList(BaseModel):
    """The tenant's API keys, newest first."""

    api_keys: list[ApiKeyView]


class Problem(BaseModel):
    """An error (RFC 9457 ``application/problem+json``) with a stable ``code``."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str = Field(description="Stable machine-readable error code.")
    correlation_id: str | None = None
    reason: str | None = Field(default=None, description="A finer reason, e.g. sold_out.")
    errors: list[dict[str, Any]] | None = None
