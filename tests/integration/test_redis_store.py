"""RedisStore's bulk writes against a real Redis: first claim wins, overwrite replaces, expiry set."""

from __future__ import annotations

import asyncio
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


async def test_concurrent_hits_count_as_if_sent_one_by_one(store):
    # hits that arrive together go to Redis in one script call; each still gets its own count
    prefix = f"test:{uuid.uuid4().hex}"
    keys = [f"{prefix}:{k}" for k in ("a", "b", "c")]
    hits = [keys[n % 3] if n % 5 else keys[0] for n in range(60)]
    await store.hit(f"{prefix}:warm-up", 7)  # (the script is loaded once)
    calls_before = await _script_calls(store)
    counts = await asyncio.gather(*(store.hit(k, 7) for k in hits))
    assert await _script_calls(store) - calls_before < len(hits) / 10  # together, not one each
    for key in keys:
        mine = [c for k, c in zip(hits, counts) if k == key]
        assert sorted(mine) == list(range(1, len(mine) + 1))  # no count given twice or skipped
        assert int(await store._client.get(key)) == len(mine)
        assert 0 < await store._client.ttl(key) <= 7  # the window started with the first hits
    assert await store.hit(keys[1], 7) == hits.count(keys[1]) + 1


async def test_a_hit_without_redis_is_unavailable_for_each_caller():
    port = free_port()  # nothing listens there
    down = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.2, connect_timeout=0.2)
    try:
        results = await asyncio.gather(*(down.hit("k", 1) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
    finally:
        await down.close()


async def _script_calls(store: RedisStore) -> int:
    stats = await store._client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
