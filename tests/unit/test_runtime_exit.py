"""A service process ends when its event loop does, whatever its tasks do on cancellation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A task that swallows its cancellation (as nats-py's do), and another that ends the loop with
# sys.exit() (as uvicorn's did on a taken port): with asyncio.run the process never exited.
STUBBORN = textwrap.dedent("""
    import asyncio, sys
    from libs.runtime import run_service

    class Stubborn:
        async def run_until_stopped(self):
            async def swallows_cancellation():
                while True:
                    try:
                        await asyncio.sleep(3600)
                    except asyncio.CancelledError:
                        pass

            async def exits():
                sys.exit(3)

            loop = asyncio.get_running_loop()
            loop.create_task(swallows_cancellation(), name="stubborn")
            loop.create_task(exits())
            await asyncio.sleep(3600)

    run_service(Stubborn(), leftover_seconds=0.5)
""")


def test_a_loop_ended_by_sys_exit_in_a_task_ends_the_process_despite_a_stubborn_task():
    try:
        done = subprocess.run([sys.executable, "-c", STUBBORN], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process did not exit: its clean-up waited for ever") from None
    assert done.returncode == 3, done.stderr[-2000:]
    said = done.stdout + done.stderr  # (no logging set up in the script: structlog's default)
    assert "tasks_left_running_at_exit" in said and "stubborn" in said, said[-2000:]
