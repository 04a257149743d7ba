"""Stopping a background task: also one that swallows its first cancellation, as nats-py's
flush and Python 3.11's ``wait_for`` can, which once left a service hanging on SIGTERM."""

from __future__ import annotations

import asyncio

from libs.background import cancel_and_wait


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again_until_it_stops():
    swallowed = 0
    unwound = asyncio.Event()

    async def stubborn_loop() -> None:
        nonlocal swallowed
        try:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if swallowed < 2:  # a library eating the cancellation, twice
                        swallowed += 1
                        continue
                    raise
        finally:
            unwound.set()

    task = asyncio.create_task(stubborn_loop())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 5.0)
    assert task.cancelled() and unwound.is_set() and swallowed == 2


async def test_a_task_that_never_stops_is_left_behind_after_the_timeout():
    hears = False

    async def deaf() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if hears:
                    raise

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, timeout=0.3), 5.0)
    assert not task.done()
    hears = True  # the test's own cleanup
    task.cancel()
    await asyncio.wait({task})


async def test_the_callers_own_cancellation_is_not_swallowed():
    async def slow_to_unwind() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.5)

    inner = asyncio.create_task(slow_to_unwind())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(inner))
    await asyncio.sleep(0.05)
    stopper.cancel()
    await asyncio.wait({stopper})
    assert stopper.cancelled()
    await asyncio.wait({inner})


async def test_a_failure_while_unwinding_is_logged_not_raised():
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), RuntimeError)
