"""The service runtime measures its event loop's stalls."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from libs import runtime


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"vge_event_loop_lag_seconds_{name}", labels) or 0.0


async def test_a_stall_of_the_loop_is_measured_as_long_as_it_was():
    longer_than_50ms = _sample("count") - _sample("bucket", le="0.05")
    within_50ms = _sample("bucket", le="0.05")
    watch = runtime.watch_loop_lag(interval=0.005)
    try:
        assert runtime.watch_loop_lag() is watch  # one watch per loop
        await asyncio.sleep(0.02)  # the watch's timer is set
        time.sleep(0.1)  # a stall: a callback that blocks the loop for 100 ms
        await asyncio.sleep(0.05)  # the watch wakes, late, then on time again
    finally:
        watch.cancel()
    assert _sample("count") - _sample("bucket", le="0.05") >= longer_than_50ms + 1
    # (the watch's own timers, without a stall: on time or about, not 50 ms late)
    assert _sample("bucket", le="0.05") >= within_50ms + 3
