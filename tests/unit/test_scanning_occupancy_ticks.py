"""The occupancy publisher's ticks (``services.scanning.bootstrap._publish_occupancy``), with a
fake store: only its timing rule is under test here; the real calls are in
tests/integration/scanning/test_events_and_failures.py."""

from __future__ import annotations

import asyncio

from services.scanning import bootstrap

_sleep = asyncio.sleep  # the fake's and this test's own waits (the publisher's are recorded)


class SlowStore:
    """A store whose every call takes ``call_seconds`` and finds one changed event."""

    def __init__(self, call_seconds: float) -> None:
        self.occupancy_changed = asyncio.Event()
        self.call_seconds = call_seconds
        self.calls = 0

    async def publish_occupancy_changes(self, limit: int) -> int:
        self.calls += 1
        await _sleep(self.call_seconds)
        self.occupancy_changed.set()  # scans keep being admitted meanwhile
        return 1


async def test_a_slow_call_shortens_the_wait_for_the_next_tick(monkeypatch):
    """A tick counts from a call's start: a call that took 40 ms of a 50-ms tick leaves at most
    10 ms to wait. (It waited the whole tick after each call, so under load, where a call takes
    10-20 ms, every change waited that much longer to be published.)"""
    monkeypatch.setattr(bootstrap, "OCCUPANCY_TICK_SECONDS", 0.05)
    store = SlowStore(call_seconds=0.04)
    waits: list[float] = []

    async def recorded_sleep(seconds: float) -> None:
        waits.append(seconds)
        await _sleep(seconds)

    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    store.occupancy_changed.set()
    publisher = asyncio.create_task(bootstrap._publish_occupancy(store))  # type: ignore[arg-type]
    try:
        while store.calls < 4:
            await _sleep(0.01)
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
    assert len(waits) >= 3  # the publisher waited between its calls
    assert max(waits) <= 0.0101
