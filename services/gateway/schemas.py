"""HTTP bodies of the public API (design §7) that are not a service's command as it is.

Most bodies are a command of ``libs.contracts`` minus the fields the gateway fills in itself
(from the credential, the path or the ``Idempotency-Key`` header), so the HTTP contract and the
NATS contract cannot drift apart. Replies are the services' reply models unchanged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field, create_model, model_validator

from libs.actor import Role
from libs.contracts import Command
from libs.contracts.payments import CompleteCheckout, CreateCheckout, CreateEvent
from libs.contracts.scanning import ScanTicket, SyncOfflineScans

__all__ = [
    "CreateEventBody", "CreateCheckoutBody", "CompleteCheckoutBody", "ScanBody", "ScanBatchBody",
    "RegisterDevice", "DeviceRegistration", "EnrolDevice", "DeviceEnrolment", "DeviceView",
    "DeviceList", "CreateApiKey", "ApiKeyIssued", "ApiKeyView", "ApiKeyList", "Problem",
]  # fmt: skip


def without_nul(value: Any) -> None:
    """Refuse U+0000 anywhere in a request: PostgreSQL text cannot hold it."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain U+0000 (NUL)")
    elif isinstance(value, dict):
        for key, item in value.items():
            without_nul(key)
            without_nul(item)
    elif isinstance(value, list):
        for item in value:
            without_nul(item)


def instants_in_range(value: Any) -> None:
    """Refuse a time that is no instant in UTC (``0001-01-01T00:00+01:00`` is before year 1),
    which the services could not store, in a parsed request and everything nested in it."""
    if isinstance(value, datetime):
        if value.utcoffset() is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(f"{value.isoformat()} is out of range") from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            instants_in_range(getattr(value, name))
    elif isinstance(value, list):
        for item in value:
            instants_in_range(item)


class Body(Command):
    """Base of every HTTP body: a command's rules, and nothing the services cannot store
    (a NUL character, a time out of range), which would otherwise come back as a 500."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        without_nul(data)
        return data

    @model_validator(mode="after")
    def _instants(self) -> Body:
        instants_in_range(self)
        return self


def _body_of(command: type[Command], name: str, *, without: set[str]) -> type[Command]:
    """``command``'s fields except ``without`` (which the gateway fills in), as an HTTP body."""
    fields: dict[str, Any] = {
        k: (f.annotation, f) for k, f in command.model_fields.items() if k not in without
    }
    return create_model(name, __base__=Body, __doc__=command.__doc__, **fields)


CreateEventBody = _body_of(CreateEvent, "CreateEventBody", without={"idempotency_key"})
CreateCheckoutBody = _body_of(CreateCheckout, "CreateCheckoutBody", without={"idempotency_key"})
CompleteCheckoutBody = _body_of(
    CompleteCheckout, "CompleteCheckoutBody", without={"checkout_id", "idempotency_key"}
)
ScanBody = _body_of(ScanTicket, "ScanBody", without={"device_event_id"})
ScanBatchBody = _body_of(SyncOfflineScans, "ScanBatchBody", without={"device_event_id"})


class RegisterDevice(Body):
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


class EnrolDevice(Body):
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


class CreateApiKey(Body):
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
