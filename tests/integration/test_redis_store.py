"""RedisStore's bulk writes against a real Redis: first claim wins, overwrite replaces, expiry set."""

from __future__ import annotations

import uuid

import pytest

from libs.redis_store import RedisStore, RedisUnavailable
from libs.servers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(redis_url):
    s = RedisStore(redis_url, timeout=2.0)
    yield s
    await s.close()


async def test_claim_only_keeps_the_first_value_of_each_key(store):
    prefix = f"test:{uuid.uuid4().hex}"
    # more keys than one script call takes (500), so the chunks are exercised too
    first = [(f"{prefix}:{n}", f"first-{n}") for n in range(2500)]
    await store.claim_only(first[::2], 60)
    await store.claim_only(first, 60)
    await store.claim_only([(k, "second") for k, _ in first], 60)
    values = await store.get_many([k for k, _ in first])
    assert values == [v for _, v in first]
    ttl = await store._client.ttl(first[0][0])
    assert 0 < ttl <= 60


async def test_set_many_overwrites_and_sets_the_expiry(store):
    prefix = f"test:{uuid.uuid4().hex}"
    keys = [f"{prefix}:{n}" for n in range(1200)]
    await store.claim_only([(k, "old") for k in keys], 60)
    await store.set_many([(k, f"new-{n}") for n, k in enumerate(keys)], 30)
    assert await store.get_many(keys) == [f"new-{n}" for n in range(len(keys))]
    assert 0 < await store._client.ttl(keys[-1]) <= 30



async def test_a_lazy_iterable_is_written_in_full(store):
    # (the tier-2 claims pass a generator, so values are encoded only as each chunk is sent)
    prefix = f"test:{uuid.uuid4().hex}"
    keys = [f"{prefix}:{n}" for n in range(1100)]
    await store.claim_only(((k, f"v-{n}") for n, k in enumerate(keys)), 60)
    assert await store.get_many(keys) == [f"v-{n}" for n in range(len(keys))]


async def test_add_hits_counts_many_windows_in_one_command(store):
    prefix = f"test:{uuid.uuid4().hex}"
    a, b = f"{prefix}:a", f"{prefix}:b"
    assert await store.add_hits({a: 3, b: 1}, 7) == [3, 1]
    assert 0 < await store._client.ttl(a) <= 7  # the window started with its first hits
    await store._client.expire(a, 100)
    assert await store.add_hits({b: 2, a: 1}, 7) == [3, 4]
    assert await store._client.ttl(a) > 7  # later hits do not move the window
    assert await store.add_hits({}, 7) == []


async def test_add_hits_without_redis_is_unavailable():
    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, connect_timeout=0.2)
    try:
        with pytest.raises(RedisUnavailable):
            await down.add_hits({"k": 1}, 1)
    finally:
        await down.close()
