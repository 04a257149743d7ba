"""libs.servers: the local NATS, PostgreSQL and Redis really answer, survive a NATS restart and
leave no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis

from libs.servers import LocalServers

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    with LocalServers(tmp_path_factory.mktemp("servers"), fsync=False) as local:
        yield local


def _live_processes() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            procs[int(entry)] = int(fields[1])
    return procs


def _tree(root: int) -> set[int]:
    """``root`` and all its live descendants (PostgreSQL's children leave its process group)."""
    procs = _live_processes()
    tree, grew = {root} if root in procs else set(), True
    while grew:
        children = {pid for pid, ppid in procs.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


async def test_each_server_answers(servers: LocalServers) -> None:
    nc = await nats.connect(servers.nats_url, allow_reconnect=False, connect_timeout=2)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()

    conn = await asyncpg.connect(servers.database_url, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW max_connections") == "300"
        # new WAL segments are not zero-filled first (that stalled commits on a new cluster)
        assert await conn.fetchval("SHOW wal_init_zero") == "off"
        # a session left idle in a transaction would hold back every outbox: it is ended
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "30s"
    finally:
        await conn.close()

    client = aioredis.from_url(servers.redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_nats_restart_keeps_url_and_jetstream_data(servers: LocalServers) -> None:
    url_before, pid_before = servers.nats_url, servers.nats.pid
    nc = await nats.connect(url_before, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        await js.add_stream(name="RESTART_PROBE", subjects=["restart.probe"])
        await js.publish("restart.probe", b"kept")
    finally:
        await nc.close()

    servers.nats.stop()
    assert servers.nats.pid is None
    with pytest.raises(ConnectionRefusedError):  # the outage is real: nobody listens any more
        await asyncio.open_connection(servers.nats.host, servers.nats.port)
    servers.nats.start()

    assert servers.nats_url == url_before
    assert servers.nats.pid not in (None, pid_before)
    nc = await nats.connect(servers.nats_url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        stream = await js.stream_info("RESTART_PROBE")
        assert stream.state.messages == 1
        msg = await js.get_msg("RESTART_PROBE", seq=1)
        assert msg.data == b"kept"
    finally:
        await nc.close()


def test_stop_leaves_no_process(servers: LocalServers) -> None:
    # Runs last in this module: it stops the shared servers (the fixture's stop is idempotent).
    leaders = {s.name: s.pid for s in servers.servers}
    assert all(leaders.values()), leaders
    spawned = set().union(*(_tree(pid) for pid in leaders.values()))
    assert set(leaders.values()) <= spawned
    assert len(spawned) > 3  # PostgreSQL forks its checkpointer, WAL writer, ...

    servers.stop()

    assert all(s.pid is None and not s.running for s in servers.servers)
    left = spawned & set(_live_processes())
    assert not left, f"processes left behind: {left}"


def test_sigterm_to_the_owner_stops_its_servers(tmp_path: Path) -> None:
    # A test run or benchmark ended by `timeout` (SIGTERM) used to leave its servers running.
    script = (
        "import sys, time\n"
        "from libs.servers import LocalServers\n"
        "servers = LocalServers(sys.argv[1], nats=False, postgres=False).start()\n"
        "print('redis_pid', servers.redis.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[2],
    )
    try:
        assert owner.stdout is not None
        line = b""
        while not line.startswith(b"redis_pid "):  # (its log lines come first, on stdout too)
            line = owner.stdout.readline()
            assert line, "the owner ended before its server started"
        redis_pid = int(line.split()[1])
        assert redis_pid in _live_processes()
        owner.send_signal(signal.SIGTERM)
        owner.wait(timeout=30)
    finally:
        owner.kill()
        owner.wait()
    assert redis_pid not in _live_processes()
