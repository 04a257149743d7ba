"""The gateway's per-credential rate limit against a real Redis: exact on one replica, shared
by replicas through Redis, still a limit (per replica) while Redis is down."""

from __future__ import annotations

import time
import uuid

import pytest
from structlog.testing import capture_logs

from libs.errors import RateLimited
from libs.redis_store import RedisStore
from libs.servers import free_port
from services.gateway.adapters import redis_limits
from services.gateway.adapters.redis_limits import RateLimiter

pytestmark = pytest.mark.integration


class _FrozenClock:
    """One second for the whole test (a window boundary mid-test would reset the counts)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()) + 1)

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.fixture
def clock(monkeypatch) -> _FrozenClock:
    frozen = _FrozenClock()
    monkeypatch.setattr(redis_limits, "time", frozen)
    return frozen


@pytest.fixture
async def redis(redis_url):
    store = RedisStore(redis_url, timeout=2.0)
    yield store
    await store.close()


async def _admitted(limiter: RateLimiter, credential: str, tries: int) -> int:
    admitted = 0
    for _ in range(tries):
        try:
            await limiter.check(credential)
            admitted += 1
        except RateLimited:
            pass
    return admitted


async def test_one_replica_admits_exactly_the_limit_and_counts_it_in_redis(redis, clock):
    credential = uuid.uuid4().hex
    limiter = RateLimiter(redis, per_second=10)
    assert await _admitted(limiter, credential, 25) == 10
    await limiter.drain()
    key = f"voelgoed:ratelimit:{credential}:{int(clock.now)}"
    assert int(await redis._client.get(key)) == 10
    assert 0 < await redis._client.ttl(key) <= 2
    clock.now += 1  # the next second is a new window
    assert await _admitted(limiter, credential, 3) == 3


async def test_replicas_share_the_limit_through_redis(redis, clock):
    credential = uuid.uuid4().hex
    a, b = RateLimiter(redis, per_second=10), RateLimiter(redis, per_second=10)
    assert await _admitted(a, credential, 6) == 6
    await a.drain()
    # b has not heard of a's six yet: its first request goes through and its count comes back
    assert await _admitted(b, credential, 1) == 1
    await b.drain()
    assert await _admitted(b, credential, 10) == 3  # 6 + 1 + 3 = the limit
    await b.drain()
    assert await _admitted(a, credential, 1) == 1  # (a learns the total with its next count)
    await a.drain()
    assert await _admitted(a, credential, 5) == 0


async def test_without_redis_each_replica_still_limits_what_it_counts(clock):
    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, connect_timeout=0.2)
    limiter = RateLimiter(down, per_second=3)
    try:
        with capture_logs() as logs:
            assert await _admitted(limiter, "cred", 2) == 2
            await limiter.drain()
            assert await _admitted(limiter, "cred", 5) == 1
            await limiter.drain()
        assert [e["event"] for e in logs].count("rate_limit_counted_locally") == 1
    finally:
        await down.close()
