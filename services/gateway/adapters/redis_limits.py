"""Per-credential rate limits in Redis (design §1), shared by every gateway replica."""

from __future__ import annotations

import time

from libs.errors import RateLimited
from libs.log import get_logger
from libs.redis_store import RedisStore, RedisUnavailable

__all__ = ["RateLimiter"]

log = get_logger(__name__)


class RateLimiter:
    """A fixed one-second window per credential.

    Redis down fails open: the limit protects capacity, it decides nothing about tickets or
    money, and refusing every gate while Redis restarts would be the worse failure.
    """

    def __init__(self, redis: RedisStore | None, per_second: int) -> None:
        self._redis = redis
        self._per_second = per_second
        self._quiet_until = 0.0

    async def check(self, credential_id: str) -> None:
        """Count one request; ``RateLimited`` past the limit of this second."""
        if self._redis is None:
            return
        window = int(time.time())
        try:
            count = await self._redis.hit(f"voelgoed:ratelimit:{credential_id}:{window}", 2)
        except RedisUnavailable:
            now = time.monotonic()
            if now >= self._quiet_until:  # once per interval, not once per request
                self._quiet_until = now + 10.0
                log.warning("rate_limit_unchecked", credential=credential_id)
            return
        if count > self._per_second:
            raise RateLimited(f"more than {self._per_second} requests per second",
                              retry_after=1, limit=self._per_second)  # fmt: skip
