"""The one place that talks to Redis: dedup claims, counters with a window, small values.

Redis is a fast path, never the authority (shared/notes: a failover can lose a claim). Every
call has a short timeout and turns "Redis is not answering" into ``RedisUnavailable``, so
callers fall back to PostgreSQL instead of stalling.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Sequence
from uuid import UUID

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from libs.batching import TenantBatches
from libs.errors import Unavailable

__all__ = ["RedisStore", "RedisUnavailable"]

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


# fixed-window counters: INCRBY each key by its hits (ARGV[2i-1]), and a window's expiry
# (ARGV[2i]) set by its first hits (Redis 6.2 has no EXPIRE NX); a script, so that both happen
# or neither; the counts after, in key order
_HIT_MANY = """local out = {}
for i = 1, #KEYS do
  local hits = tonumber(ARGV[2 * i - 1])
  local n = redis.call('INCRBY', KEYS[i], hits)
  if n == hits then redis.call('EXPIRE', KEYS[i], ARGV[2 * i]) end
  out[i] = n
end
return out"""
_ALL_HITS = UUID(int=0)  # (hits are batched across tenants: one queue)


# many SET ... EX (NX or not) in one command: a pipeline of thousands of SETs cost the caller
# more CPU (packing and parsing each) than the batch of scans it records
_SET_EACH = """local nx = ARGV[1] == 'nx'
for i = 1, #KEYS do
  if nx then redis.call('SET', KEYS[i], ARGV[i + 2], 'NX', 'EX', ARGV[2])
  else redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[2]) end
end
return #KEYS"""
_SET_CHUNK = 500  # keys per script call: Redis runs a script alone, so keep each one short


class RedisUnavailable(Unavailable):
    """Redis did not answer in time."""


class RedisStore:
    """Async Redis access with the operations the platform needs and nothing else."""

    def __init__(self, url: str, *, timeout: float = 0.1, connect_timeout: float = 1.0) -> None:
        # a short operation timeout keeps a hanging Redis from stalling callers; connecting
        # gets longer because a burst of new connections on a busy host is slow, not broken
        self._client = aioredis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            max_connections=64,
            decode_responses=True,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        self._hit_many = self._client.register_script(_HIT_MANY)
        self._set_each = self._client.register_script(_SET_EACH)
        # a gateway counts every request: hits that arrive while a count is under way go
        # together in the next script call (one round trip for many requests, not one each)
        self._hits: TenantBatches[tuple[str, int]] = TenantBatches("redis_hits", self._count_hits)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self._client.ping())
        except _DOWN:
            return False

    async def claim_only(self, items: Iterable[tuple[str, str]], ttl_seconds: int) -> None:
        """``SET NX EX`` for many keys, without reading the holders back."""
        await self._set_all(items, ttl_seconds, only_new=True)

    async def set_many(self, items: Iterable[tuple[str, str]], ttl_seconds: int) -> None:
        """Set many keys with an expiry."""
        await self._set_all(items, ttl_seconds, only_new=False)

    async def _set_all(self, items: Iterable[tuple[str, str]], ttl_seconds: int, *, only_new: bool) -> None:
        # ``items`` is taken a chunk at a time: a lazy iterable (e.g. of values still to encode)
        # is built only as each chunk is sent, so a big batch never holds the event loop
        mode = "nx" if only_new else "set"
        remaining = iter(items)
        try:
            while chunk := list(islice(remaining, _SET_CHUNK)):
                await self._set_each(
                    keys=[key for key, _ in chunk], args=[mode, ttl_seconds, *(value for _, value in chunk)]
                )
        except _DOWN as exc:
            raise RedisUnavailable(f"redis: {exc}") from exc

    async def get(self, key: str) -> str | None:
        """The value at ``key``, or None."""
        try:
            return await self._client.get(key)
        except _DOWN as exc:
            raise RedisUnavailable(f"redis: {exc}") from exc

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values at ``keys`` (``MGET``: one round trip)."""
        if not keys:
            return []
        try:
            return list(await self._client.mget(list(keys)))
        except _DOWN as exc:
            raise RedisUnavailable(f"redis: {exc}") from exc

    async def set(self, key: str, value: str, ttl_seconds: int | None = None) -> None:
        """Set ``key`` (optionally expiring)."""
        try:
            await self._client.set(key, value, ex=ttl_seconds)
        except _DOWN as exc:
            raise RedisUnavailable(f"redis: {exc}") from exc

    async def delete(self, *keys: str) -> int:
        """Delete keys; returns how many existed."""
        try:
            return int(await self._client.delete(*keys))
        except _DOWN as exc:
            raise RedisUnavailable(f"redis: {exc}") from exc

    async def hit(self, key: str, window_seconds: int) -> int:
        """Count one hit in a fixed window (rate limits); returns the count so far, this hit
        included: exactly what an INCR of its own would have returned, as if the hits sent
        together had been sent one after the other."""
        return await self._hits.submit(_ALL_HITS, (key, window_seconds))

    async def _count_hits(self, _: UUID, hits: list[tuple[str, int]]) -> list[Any]:
        per_key: dict[str, list[int]] = {}  # key -> [hits, window], in first-hit order
        for key, window in hits:
            per_key.setdefault(key, [0, window])[0] += 1
        try:
            # one atomic script (INCRBY, EXPIRE on the first hits: the window starts with them)
            # in one command: a MULTI/SET NX EX/INCR/EXEC pipeline cost the caller twice the CPU
            totals = await self._hit_many(keys=list(per_key), args=[v for kw in per_key.values() for v in kw])
        except _DOWN as exc:
            # each caller's own answer (not the batch's failure: Redis down is expected)
            return [RedisUnavailable(f"redis: {exc}")] * len(hits)
        # the hits of one key get the counts its INCRBY passed through, in arrival order
        next_count = {key: int(total) - kw[0] + 1 for (key, kw), total in zip(per_key.items(), totals)}
        counts = []
        for key, _ in hits:
            counts.append(next_count[key])
            next_count[key] += 1
        return counts
