"""The service runtime's garbage-collector pauses are measured."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from libs import runtime


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(f"vge_gc_pause_seconds_{name}", {"generation": "2"}) or 0.0


def test_every_collection_is_timed_by_one_timer():
    runtime.watch_gc_pauses()
    runtime.watch_gc_pauses()  # a second call adds no second timer
    assert gc.callbacks.count(runtime._time_gc) == 1
    count, seconds = _sample("count"), _sample("sum")
    gc.collect()
    # (at least: another test's thread may collect meanwhile)
    assert _sample("count") >= count + 1 and _sample("sum") > seconds
