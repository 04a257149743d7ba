"""Fixtures of the audit service's integration tests: publish events straight to JetStream, read
the audit schema as an administrator, ask the service over signed commands.

Every test uses organizations of its own (fresh UUIDs), so tests sharing the session's servers
and the audit consumer's durable never see each other's records. The helpers travel on the
``bench`` fixture (this folder is not a package, so test modules cannot import them).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from libs.actor import Actor, ActorType, Role
from libs.commands import CommandClient
from libs.context import ContextSigner
from libs.envelope import Envelope
from libs.jetstream import ensure_streams
from libs.subjects import EVENTS_STREAM
from libs.subjects import event as event_subject
from services.audit.bootstrap import DURABLE as AUDIT_DURABLE


def owner_of(org: uuid.UUID, role: Role = Role.OWNER) -> Actor:
    """A user of ``org`` with ``role``."""
    return Actor(user_id=f"u-{role}-{org.hex[:6]}", organization_id=org, role=role, type=ActorType.USER)


PLATFORM_ADMIN = Actor(
    user_id="ops-1", organization_id=None, role=None, type=ActorType.USER, is_platform_admin=True
)
PLATFORM_STAFF = Actor(
    user_id="support-1", organization_id=None, role=None, type=ActorType.USER, is_platform_staff=True
)


def sample_event(org: uuid.UUID, n: int, type_: str = "scan.accepted", **data: Any) -> Envelope:
    """The ``n``-th event of a test in ``org``, by a device of that org."""
    actor = Actor(user_id=f"device-{n % 3}", organization_id=org, role=None, type=ActorType.DEVICE)
    return Envelope(
        type=type_, org_id=org, actor=actor, correlation_id=f"corr-{org.hex[:8]}-{n}",
        data={"scan_id": f"scan-{n}", "ticket_code": f"TCK-{n}", "n": n, **data},
    )


@dataclass
class ChainStats:
    """What the audit schema holds for one tenant, read as an administrator (no RLS)."""

    count: int
    distinct_events: int
    min_seq: int | None
    max_seq: int | None
    head_seq: int | None


@dataclass
class AuditBench:
    """The test's hands on the audit log: publish, read as admin, send commands."""

    js: Any
    db: asyncpg.Pool
    commands: CommandClient
    eventually: Callable[..., Awaitable[None]]  # the suite's (tests/conftest.py)

    owner_of = staticmethod(owner_of)
    sample_event = staticmethod(sample_event)
    PLATFORM_ADMIN = PLATFORM_ADMIN
    PLATFORM_STAFF = PLATFORM_STAFF

    async def publish(self, events: Iterable[Envelope], *, msg_id_suffix: str = "") -> int:
        """Publish to ``vge.evt.<org>.test.<entity>.<verb>`` with ``Nats-Msg-Id`` = event id
        (plus ``msg_id_suffix``, to get past JetStream's duplicate window on purpose); returns
        the highest stream sequence of them."""
        acks = [
            self.js.publish(
                event_subject(e.org_id, "test", e.type), e.to_bytes(),
                headers={"Nats-Msg-Id": f"{e.event_id}{msg_id_suffix}"},
            )
            for e in events
        ]
        last = 0
        for i in range(0, len(acks), 200):
            last = max([last, *(ack.seq for ack in await asyncio.gather(*acks[i : i + 200]))])
        return last

    async def wait_consumed(self, stream_seq: int, timeout: float = 20.0) -> None:
        """Wait until the audit consumer has handled (acked or dead-lettered) every message up
        to ``stream_seq``: after that, nothing more can change what it recorded of them."""

        async def past() -> bool:
            info = await self.js.consumer_info(EVENTS_STREAM, AUDIT_DURABLE)
            return info.ack_floor.stream_seq >= stream_seq

        await self.eventually(past, timeout, f"audit consumer past stream sequence {stream_seq}")

    async def stats(self, org: uuid.UUID) -> ChainStats:
        row = await self.db.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS d, min(seq) AS lo, max(seq) AS hi, "
            "(SELECT last_seq FROM audit.chain_heads WHERE organization_id = $1) AS head "
            "FROM audit.records WHERE organization_id = $1",
            org,
        )
        return ChainStats(row["n"], row["d"], row["lo"], row["hi"], row["head"])

    async def wait_for_records(self, org: uuid.UUID, n: int, timeout: float = 20.0) -> ChainStats:
        """Wait until ``org`` has at least ``n`` records; returns the final stats."""

        async def enough() -> bool:
            return (await self.stats(org)).count >= n

        await self.eventually(enough, timeout, f"{n} audit records for {org}")
        return await self.stats(org)

    async def event_ids(self, org: uuid.UUID) -> list[uuid.UUID]:
        rows = await self.db.fetch(
            "SELECT event_id FROM audit.records WHERE organization_id = $1 ORDER BY seq", org
        )
        return [r["event_id"] for r in rows]

    async def verify(self, org: uuid.UUID, actor: Actor | None = None) -> dict[str, Any]:
        """``vge.cmd.audit.verify`` for ``org`` as ``actor`` (default: an owner of ``org``)."""
        return await self._command("verify", org, actor or owner_of(org), {})

    async def query(self, org: uuid.UUID, actor: Actor | None = None, **filters: Any) -> dict[str, Any]:
        """``vge.cmd.audit.query`` on ``org``'s log as ``actor`` (default: an owner of ``org``)."""
        return await self._command("query", org, actor or owner_of(org), filters)

    async def _command(self, name: str, org: uuid.UUID, actor: Actor, body: dict[str, Any]) -> dict[str, Any]:
        # the context carries the actor's own tenant (the signer refuses anything else); another
        # tenant can only be named in the body
        if actor.organization_id != org:
            body = {**body, "organization_id": str(org)}
        return await self.commands.request(
            f"vge.cmd.audit.{name}", body, actor=actor, org_id=actor.organization_id,
            correlation_id=f"{name}-{uuid.uuid4().hex[:8]}", timeout=10,
        )


@pytest.fixture
async def audit_db(admin_dsn: str):
    """An administrator's pool (superuser: row-level security does not apply)."""
    pool = await asyncpg.create_pool(admin_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def bench(nc: NATS, audit_db: asyncpg.Pool, commands: CommandClient, eventually) -> AuditBench:
    js = nc.jetstream()
    await ensure_streams(js)
    return AuditBench(js, audit_db, commands, eventually)


@pytest.fixture
def bench_via(audit_db: asyncpg.Pool, signer: ContextSigner, eventually) -> Callable[[NATS, Any], AuditBench]:
    """``bench_via(nc, js)``: the same hands through another NATS connection (a cluster's, say)."""
    return lambda nc, js: AuditBench(js, audit_db, CommandClient(nc, signer), eventually)
