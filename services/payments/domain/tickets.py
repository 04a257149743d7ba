"""Ticket codes: unguessable, so knowing some codes never helps to guess another."""

from __future__ import annotations

import secrets

__all__ = ["new_ticket_code"]


def new_ticket_code() -> str:
    """A fresh code: 16 random bytes (128 bits) as URL-safe base64, 22 characters."""
    return secrets.token_urlsafe(16)
