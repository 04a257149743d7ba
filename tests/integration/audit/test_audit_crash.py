"""The audit service killed (SIGKILL) in the middle of a stream of events and started again:
still exactly one record per event, no gaps, and the chain verifies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from libs.servers import free_port

N = 1500


def _start_audit(server_urls: dict[str, str], public_key: str, log: Path) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    port = free_port()
    env.update(
        VGE_NATS_URL=server_urls["nats_url"], VGE_DATABASE_URL=server_urls["database_url"],
        VGE_REDIS_URL=server_urls["redis_url"], VGE_CONTEXT_PUBLIC_KEYS=public_key,
        VGE_HEALTH_PORT=str(port), VGE_LOG_FORMAT="json", VGE_LOG_LEVEL="WARNING",
    )
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.audit"], env=env,
                                stdout=subprocess.DEVNULL, stderr=out)
    return proc, port


async def _healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "audit service did not become healthy"
            await asyncio.sleep(0.1)


async def test_killed_mid_stream_and_restarted_records_every_event_once(
    bench, server_urls, context_keys, tmp_path
):
    log = tmp_path / "audit.log"
    org = uuid.uuid4()
    events = [bench.sample_event(org, n) for n in range(N)]
    proc, port = _start_audit(server_urls, context_keys[1], log)
    try:
        await _healthy(proc, port, log)

        async def publish_steadily() -> None:
            for i in range(0, N, 30):
                await bench.publish(events[i : i + 30])
                await asyncio.sleep(0.02)

        publishing = asyncio.create_task(publish_steadily())

        async def some_recorded() -> bool:
            return (await bench.stats(org)).count >= 200

        await bench.eventually(some_recorded, timeout=30, what="200 records before the kill")
        proc.kill()  # SIGKILL: no drain, no acks for what it holds
        proc.wait(timeout=10)
        at_kill = (await bench.stats(org)).count
        assert not publishing.done(), "the stream should still be flowing when the service dies"
        assert 0 < at_kill < N
        await publishing
        # a replayed copy of some events too, as a producer retry would send them
        last = await bench.publish(events[:100], msg_id_suffix="-retry")

        proc, port = _start_audit(server_urls, context_keys[1], log)
        await _healthy(proc, port, log)
        # what the dead instance held comes back after the consumer's ack wait (5 s)
        await bench.wait_for_records(org, N, timeout=40)
        await bench.wait_consumed(last)
        stats = await bench.stats(org)
        assert (stats.count, stats.distinct_events) == (N, N)
        assert (stats.min_seq, stats.max_seq, stats.head_seq) == (1, N, N)
        assert set(await bench.event_ids(org)) == {e.event_id for e in events}
        verified = await bench.verify(org)
        assert (verified["ok"], verified["records_checked"]) == (True, N)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
