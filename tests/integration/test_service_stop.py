"""A service process stops on SIGTERM however its servers are doing: NATS gone first, or a
server that accepts connections but never answers while the service is still starting.
An orchestrator sends SIGTERM and waits its grace period; a process that hangs there is killed
mid-write instead of stopping in order."""

from __future__ import annotations

import asyncio
import socket

from libs.servers import NatsServer


async def test_an_orderly_stop_closes_both_nats_connections_without_a_warning(service_process):
    # draining our own connections disconnects them: that is not the warning an operator
    # watches for (NATS gone)
    scanning = service_process("scanning")
    await scanning.healthy()
    code = await scanning.sigterm(20.0)
    text = scanning.log_text()
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"nats_disconnected"' not in text, text[-3000:]
    for connection in ("vge-scanning", "vge-scanning-outbox"):
        assert f'"connection": "{connection}"' in text, text[-3000:]
    assert text.count('"nats_closed"') == 2, text[-3000:]


async def test_healthy_means_started_so_a_sigterm_at_the_first_ok_stops_in_order(service_process):
    # an orchestrator may stop a replica the moment it reports healthy (a rolling update): a
    # /healthz that said ok before the start had finished made that SIGTERM abandon the start,
    # with commands already being served and no connection drained
    scanning = service_process("scanning")
    await scanning.healthy(every=0.0)  # asked as often as it can be: no window missed
    code = await scanning.sigterm(20.0)
    text = scanning.log_text()
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"stopped_while_starting"' not in text, text[-3000:]
    assert '"service_stopped"' in text, text[-3000:]
    assert text.count('"nats_closed"') == 2, text[-3000:]


async def test_sigterm_after_nats_went_away_stops_cleanly(service_process, tmp_path):
    own_nats = NatsServer(tmp_path / "nats").start()
    scanning = service_process("scanning", VGE_NATS_URL=own_nats.url)
    try:
        await scanning.healthy()
        own_nats.stop()
        await asyncio.sleep(2.0)  # the client is reconnecting by now
        code = await scanning.sigterm(20.0)
    finally:
        own_nats.stop()
    text = scanning.log_text()
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"service_stopped"' in text
    assert "Traceback" not in text


async def test_sigterm_while_a_server_never_answers_abandons_the_start(service_process):
    # a "PostgreSQL" that accepts the connection and then says nothing: start-up waits on it
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the client goes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    pg_port = server.sockets[0].getsockname()[1]
    scanning = service_process(
        "scanning", VGE_NATS_URL="nats://127.0.0.1:1",
        VGE_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
        VGE_REDIS_URL="redis://127.0.0.1:1/0",
    )
    try:
        await asyncio.wait_for(accepted.wait(), 30.0)
        await asyncio.sleep(0.3)
        code = await scanning.sigterm(10.0)
    finally:
        server.close()
    text = scanning.log_text()
    assert code is not None, "the service hung on SIGTERM during start-up:\n" + text[-3000:]
    assert code == 0, f"exit code {code}:\n{text[-3000:]}"
    assert '"stopped_while_starting"' in text


async def test_a_service_whose_port_is_taken_exits_instead_of_hanging(service_process):
    # uvicorn's own bind ended the event loop with sys.exit(), and the clean-up then waited for
    # ever on a task that swallowed its cancellation: about one start in three never exited
    # (audit). A process that hangs is never restarted by an orchestrator.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for attempt in range(1, 4):
            audit = service_process("audit", VGE_HEALTH_PORT=str(taken.getsockname()[1]))
            code = await audit.exited(20.0)
            text = audit.log_text()  # (the attempts share one log)
            assert code != 0, text[-3000:]
            assert text.lower().count("address already in use") >= attempt, text[-3000:]
            assert text.count("start_failed") == attempt  # it stopped what it had started first
    finally:
        taken.close()
