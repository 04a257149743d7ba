"""Background tasks of a service process: the one way to stop one."""

from __future__ import annotations

import asyncio

from libs.log import get_logger

__all__ = ["cancel_and_wait"]

log = get_logger(__name__)


async def cancel_and_wait(task: asyncio.Task[object] | None, *, timeout: float = 10.0) -> None:
    """Cancel ``task`` and wait until it has unwound (its ``finally`` blocks ran).

    It is cancelled again for as long as it runs on: code that swallows a ``CancelledError``
    (nats-py's flush does; so does Python 3.11's ``wait_for`` when what it waits for finishes at
    the same moment) would otherwise keep a loop going and its service from ever stopping. After
    ``timeout`` it is left behind, logged. A failure of the task is logged, not raised: stopping
    goes on. The caller's own cancellation is never swallowed."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error("task_did_not_stop", task=task.get_name(), seconds=timeout)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.5, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.warning("task_failed_before_stop", task=task.get_name(), error=repr(task.exception()))
