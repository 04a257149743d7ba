"""The one place that talks to Redis: dedup claims, counters with a window, small values.

Redis is a fast path, never the authority (shared/notes: a failover can lose a claim). Every
call has a short timeout and turns "Redis is not answering" into ``RedisUnavailable``, so
callers fall back to PostgreSQL instead of stalling.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Mapping, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

    async def add_hits(self, hits: Mapping[str, int], window_seconds: int) -> list[int]:
        """Add ``hits[key]`` to each fixed-window counter (rate limits), a window starting with
        its first hits; returns each counter's total after, in ``hits``' order. One command
        for every key."""
        if not hits:
            return []
        try:
            # one atomic script (INCRBY, EXPIRE on the first hits) in one command: a MULTI/SET NX
            # EX/INCR/EXEC pipeline per key cost the caller twice the CPU
            totals = await self._hit_many(
                keys=list(hits), args=[v for n in hits.values() for v in (n, window_seconds)])
        except _DOWN as exc:
            raise RedisUnavailable(f"redis: {exc}") from exc
        return [int(t) for t in totals]
