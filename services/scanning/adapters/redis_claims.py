"""Tier 2 of the dedup (design §5): admissions shared by every replica through Redis.

A key is only ever written after the authority (PostgreSQL) admitted the ticket, with
``SET NX EX`` so the first admission's details stay; a crash between claim and commit can
therefore never leave a false "already admitted" behind. Redis down or slow: the breaker opens
and the scan goes to the authority, which decides alone.
"""

from __future__ import annotations

from typing import Sequence
from uuid import UUID

from libs.log import get_logger
from libs.redis_store import RedisStore, RedisUnavailable
from services.scanning.domain import (
    CLAIM_WINDOW_SECONDS,
    Admission,
    Breaker,
    claim_key,
    decode_admission,
    encode_admission,
)

__all__ = ["AdmissionClaims"]

log = get_logger(__name__)


class AdmissionClaims:
    """Bulk reads and writes of admission claims, one round trip per batch."""

    def __init__(self, store: RedisStore | None, window_seconds: int = CLAIM_WINDOW_SECONDS):
        self._store = store
        self._window = window_seconds
        self._breaker = Breaker()

    async def admissions(self, keys: Sequence[tuple[UUID, str]]) -> list[Admission | None]:
        """The known admission of each (org, ticket code), None where unknown or Redis is down."""
        if not keys or self._store is None or not self._breaker.closed:
            return [None] * len(keys)
        try:
            values = await self._store.get_many([claim_key(org, code) for org, code in keys])
        except RedisUnavailable as exc:
            self._down(exc)
            return [None] * len(keys)
        return [decode_admission(v) for v in values]

    async def claim(
        self,
        admissions: Sequence[tuple[UUID, str, Admission]],
        replaced: Sequence[tuple[UUID, str, Admission]] = (),
    ) -> None:
        """Record authority-confirmed admissions (``SET NX EX``: the first one stays), and
        overwrite the ones the authority moved to an earlier offline scan."""
        if not (admissions or replaced) or self._store is None or not self._breaker.closed:
            return
        try:
            # lazily: the store encodes a chunk as it sends it (an upload's 10,000 admissions
            # encoded in one go held the event loop, and the upload's reply, ~0.1 s)
            await self._store.claim_only(
                ((claim_key(org, code), encode_admission(a)) for org, code, a in admissions), self._window
            )
            await self._store.set_many(
                ((claim_key(org, code), encode_admission(a)) for org, code, a in replaced), self._window
            )
        except RedisUnavailable as exc:
            self._down(exc)

    async def release(self, org_id: UUID, ticket_code: str) -> None:
        """Forget a ticket's admission (e.g. it was cancelled)."""
        if self._store is None:
            return
        try:
            await self._store.delete(claim_key(org_id, ticket_code))
        except RedisUnavailable as exc:
            self._down(exc)

    def _down(self, exc: Exception) -> None:
        if self._breaker.closed:  # log the transition, not every scan in flight
            log.warning("redis_unavailable_scans_go_to_postgres", error=str(exc))
        self._breaker.failed()
