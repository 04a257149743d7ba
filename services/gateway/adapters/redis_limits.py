"""Per-credential rate limits in Redis (design §1), shared by every gateway replica."""

from __future__ import annotations

import time

from libs.batching import BackgroundBatches
from libs.errors import RateLimited
from libs.log import get_logger
from libs.redis_store import RedisStore, RedisUnavailable

__all__ = ["RateLimiter"]

log = get_logger(__name__)

_WINDOW_TTL_SECONDS = 2  # a one-second window's counter outlives it a little, then expires


class _Window:
    """One credential's count in the current second, as this replica knows it."""

    __slots__ = ("counted", "sending", "unsent")

    def __init__(self) -> None:
        self.counted = 0  # the total in Redis at the last answer (every replica's hits)
        self.sending = 0  # this replica's hits in the write under way
        self.unsent = 0  # this replica's hits not sent yet

    @property
    def known(self) -> int:
        return self.counted + self.sending + self.unsent


class RateLimiter:
    """A fixed one-second window per credential, counted in Redis across replicas.

    A request is decided at once on what this replica knows: the window's total in Redis at
    its last answer plus this replica's hits since. The hits go to Redis in the background, all
    that arrived during the write before together in one command (``RedisStore.add_hits``), so
    no request waits for Redis and Redis sees a write per round trip, not one per request.
    One replica enforces the limit exactly; several may together let through, over the limit,
    what each admits during one Redis round trip before it hears of the others.

    Redis down fails open to this replica's own count: the limit protects capacity, it decides
    nothing about tickets or money, and refusing every gate while Redis restarts would be the
    worse failure.
    """

    def __init__(self, redis: RedisStore | None, per_second: int) -> None:
        self._redis = redis
        self._per_second = per_second
        self._second = 0
        self._windows: dict[str, _Window] = {}  # counter key -> its window, this second only
        self._writes: BackgroundBatches[str] = BackgroundBatches("rate_limit_counts", self._send)
        self._quiet_until = 0.0

    async def check(self, credential_id: str) -> None:
        """Count one request; ``RateLimited`` past the limit of this second."""
        if self._redis is None:
            return
        second = int(time.time())
        if second != self._second:  # a new window: the last one's counts are history
            self._second, self._windows = second, {}
        key = f"voelgoed:ratelimit:{credential_id}:{second}"
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        if window.known >= self._per_second:
            raise RateLimited(f"more than {self._per_second} requests per second",
                              retry_after=1, limit=self._per_second)  # fmt: skip
        window.unsent += 1
        if window.unsent == 1:
            self._writes.add([key])

    async def drain(self) -> None:
        """Wait for the counts under way (shutdown, tests)."""
        await self._writes.drain()

    async def _send(self, keys: list[str]) -> None:
        assert self._redis is not None
        sending = {key: window for key in keys if (window := self._windows.get(key)) is not None}
        hits = {}
        for key, window in sending.items():
            hits[key], window.sending, window.unsent = window.unsent, window.unsent, 0
        try:
            totals = await self._redis.add_hits(hits, _WINDOW_TTL_SECONDS)
        except RedisUnavailable:
            for window in sending.values():
                window.counted += window.sending  # still counted here, if not in Redis
                window.sending = 0
            now = time.monotonic()
            if now >= self._quiet_until:  # once per interval, not once per write
                self._quiet_until = now + 10.0
                log.warning("rate_limit_counted_locally", keys=len(hits))
            return
        for window, total in zip(sending.values(), totals):
            # (a window that ended meanwhile is simply no longer looked at)
            window.counted, window.sending = max(window.counted, total), 0
