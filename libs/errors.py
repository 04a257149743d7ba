"""Typed errors with stable codes, shared by NATS error replies and HTTP problem+json."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel

__all__ = [
    "ErrorCode",
    "ErrorReply",
    "DomainError",
    "InvalidInput",
    "Unauthenticated",
    "Forbidden",
    "NotFound",
    "Conflict",
    "Unavailable",
    "RateLimited",
    "PayloadTooLarge",
    "HTTP_STATUS",
]


class ErrorCode(StrEnum):
    """The stable error vocabulary clients may rely on."""

    INVALID_INPUT = "invalid_input"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class ErrorReply(BaseModel):
    """The reply a service sends instead of a result when a command fails."""

    error: ErrorCode
    detail: str
    correlation_id: str | None = None
    extra: dict[str, Any] = {}


class DomainError(Exception):
    """Base of every expected failure; carries the stable code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_reply(self, correlation_id: str | None = None) -> ErrorReply:
        """The NATS error reply for this error."""
        return ErrorReply(
            error=self.code, detail=self.detail, correlation_id=correlation_id, extra=self.extra
        )


class InvalidInput(DomainError):
    """The message does not parse or breaks a rule of its schema."""

    code = ErrorCode.INVALID_INPUT


class Unauthenticated(DomainError):
    """No valid signed context (missing, expired, tampered, unknown key, wrong subject)."""

    code = ErrorCode.UNAUTHENTICATED


class Forbidden(DomainError):
    """The policy table does not let this actor do this."""

    code = ErrorCode.FORBIDDEN


class NotFound(DomainError):
    """No such resource in the caller's tenant (also for another tenant's resources)."""

    code = ErrorCode.NOT_FOUND


class Conflict(DomainError):
    """The request conflicts with the current state."""

    code = ErrorCode.CONFLICT


class Unavailable(DomainError):
    """A dependency the answer needs is down; retry later. Never a guessed success."""

    code = ErrorCode.UNAVAILABLE


class RateLimited(DomainError):
    """The credential made more requests than its limit allows; retry after ``retry_after``."""

    code = ErrorCode.RATE_LIMITED


class PayloadTooLarge(DomainError):
    """The request body is larger than the gateway accepts."""

    code = ErrorCode.PAYLOAD_TOO_LARGE
