"""Idempotency-Key replays (design §7): one stored response per (credential, key). Pure."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from libs.errors import InvalidInput

__all__ = ["IDEMPOTENCY_HEADER", "Claimed", "Replay", "InProgress", "Mismatch", "check_key",
           "request_fingerprint", "keeps_response"]  # fmt: skip

IDEMPOTENCY_HEADER = "Idempotency-Key"
_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces


def check_key(key: str) -> str:
    """The key as given, or ``InvalidInput`` if it is empty, too long or not printable ASCII."""
    if not _KEY.match(key):
        raise InvalidInput("Idempotency-Key must be 1-200 printable ASCII characters",
                           reason="bad_idempotency_key")  # fmt: skip
    return key


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": a key reused for another request is refused."""
    return hashlib.sha256(b"%s %s\n%s" % (method.encode(), path.encode(), body)).hexdigest()


def keeps_response(status_code: int) -> bool:
    """A 5xx outcome is unknown (the service may not have answered): the key stays free so the
    client's retry does the work; anything else is the answer and is replayed."""
    return status_code < 500


@dataclass(frozen=True)
class Claimed:
    """This request owns the key: do the work, then store the response."""


@dataclass(frozen=True)
class Replay:
    """The key was used before for this same request: send the stored response."""

    status_code: int
    body: Any


@dataclass(frozen=True)
class InProgress:
    """The first request with the key has not finished yet."""


@dataclass(frozen=True)
class Mismatch:
    """The key was used for a different request."""
