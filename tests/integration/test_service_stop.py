"""A service process stops on SIGTERM however its servers are doing: NATS gone first, or a
server that accepts connections but never answers while the service is still starting.
An orchestrator sends SIGTERM and waits its grace period; a process that hangs there is killed
mid-write instead of stopping in order."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from libs.servers import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def _spawn(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    out = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.scanning"], cwd=ROOT,
        env={**os.environ, "VGE_ENVIRONMENT": "test", "VGE_LOG_FORMAT": "json",
             "VGE_HEALTH_PORT": str(port), **env},
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out.close()
    return proc, port


async def _healthy(proc: subprocess.Popen, port: int, log: Path, *, every: float = 0.1) -> None:
    """Wait (up to 30 s) for the first 200 from ``/healthz``, asking every ``every`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    async with httpx.AsyncClient() as http:
        while loop.time() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz", timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                await asyncio.sleep(max(every, 0.01))  # not listening yet
                continue
            await asyncio.sleep(every)
    raise AssertionError("service not healthy in time:\n" + log.read_text(errors="replace")[-3000:])


def _env(server_urls: dict[str, str], context_keys: tuple[str, str], **overrides: str) -> dict[str, str]:
    """The service's settings on the session's servers."""
    return {"VGE_NATS_URL": server_urls["nats_url"], "VGE_DATABASE_URL": server_urls["database_url"],
            "VGE_REDIS_URL": server_urls["redis_url"], "VGE_CONTEXT_PUBLIC_KEYS": context_keys[1],
            **overrides}


async def _sigterm(proc: subprocess.Popen, timeout: float) -> int | None:
    """SIGTERM, then the exit code; None (and SIGKILL) if the process is still there after
    ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    for _ in range(int(timeout / 0.05)):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    proc.kill()
    proc.wait(5)
    return None


async def test_an_orderly_stop_closes_both_nats_connections_without_a_warning(server_urls, context_keys,
                                                                                tmp_path):
    # draining our own connections disconnects them: that is not the warning an operator
    # watches for (NATS gone)
    log = tmp_path / "scanning.log"
    proc, port = _spawn(_env(server_urls, context_keys), log)
    await _healthy(proc, port, log)
    code = await _sigterm(proc, 20.0)
    text = log.read_text(errors="replace")
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"nats_disconnected"' not in text, text[-3000:]
    for connection in ("vge-scanning", "vge-scanning-outbox"):
        assert f'"connection": "{connection}"' in text, text[-3000:]
    assert text.count('"nats_closed"') == 2, text[-3000:]


async def test_healthy_means_started_so_a_sigterm_at_the_first_ok_stops_in_order(server_urls, context_keys,
                                                                                   tmp_path):
    # an orchestrator may stop a replica the moment it reports healthy (a rolling update): a
    # /healthz that said ok before the start had finished made that SIGTERM abandon the start,
    # with commands already being served and no connection drained
    log = tmp_path / "scanning.log"
    proc, port = _spawn(_env(server_urls, context_keys), log)
    await _healthy(proc, port, log, every=0.0)  # asked as often as it can be: no window missed
    code = await _sigterm(proc, 20.0)
    text = log.read_text(errors="replace")
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"stopped_while_starting"' not in text, text[-3000:]
    assert '"service_stopped"' in text, text[-3000:]
    assert text.count('"nats_closed"') == 2, text[-3000:]


async def test_sigterm_after_nats_went_away_stops_cleanly(server_urls, context_keys, tmp_path):
    own_nats = NatsServer(tmp_path / "nats").start()
    log = tmp_path / "scanning.log"
    proc, port = _spawn(_env(server_urls, context_keys, VGE_NATS_URL=own_nats.url), log)
    try:
        await _healthy(proc, port, log)
        own_nats.stop()
        await asyncio.sleep(2.0)  # the client is reconnecting by now
        code = await _sigterm(proc, 20.0)
    finally:
        own_nats.stop()
    text = log.read_text(errors="replace")
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"service_stopped"' in text
    assert "Traceback" not in text


async def test_sigterm_while_a_server_never_answers_abandons_the_start(context_keys, tmp_path):
    # a "PostgreSQL" that accepts the connection and then says nothing: start-up waits on it
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client goes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    pg_port = server.sockets[0].getsockname()[1]
    log = tmp_path / "scanning.log"
    proc, _ = _spawn({
        "VGE_NATS_URL": "nats://127.0.0.1:1",
        "VGE_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
        "VGE_REDIS_URL": "redis://127.0.0.1:1/0", "VGE_CONTEXT_PUBLIC_KEYS": context_keys[1],
    }, log)  # fmt: skip
    try:
        await asyncio.wait_for(accepted.wait(), 30.0)
        await asyncio.sleep(0.3)
        code = await _sigterm(proc, 10.0)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    text = log.read_text(errors="replace")
    assert code is not None, "the service hung on SIGTERM during start-up:\n" + text[-3000:]
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"stopped_while_starting"' in text
