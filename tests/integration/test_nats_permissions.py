"""The broker enforces the message rules (design §3) on a real nats-server with the rendered
users: only the gateway sends commands, a service publishes only its own events, reads only
through its own consumers and replies only through responses, and nobody gets in without a
login. The real scanning and audit services run under their own users end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import asyncpg
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from libs.actor import Actor, ActorType, Role
from libs.commands import CommandClient, CommandRouter, flush_in_order
from libs.context import ContextSigner, ContextVerifier, load_private_key, load_public_keys
from libs.contracts.catalog import EventCreated, TicketIssued, TicketTypeInfo
from libs.envelope import Envelope
from libs.jetstream import DLQ_SUBJECT_HEADER, ensure_streams
from libs.nats_auth import USERS, connect_options, generate_password, generate_passwords, password_variable
from libs.servers import NatsServer, _nats_binary
from libs.subjects import DEAD_LETTER_STREAM, EVENTS_STREAM
from services.audit.bootstrap import build as build_audit
from services.gateway.adapters.nats_feeds import OccupancyFeed, RevocationBroadcast
from services.scanning.bootstrap import build as build_scanning

DEPLOY = Path(__file__).parents[2] / "deploy" / "nats"


@pytest.fixture(scope="module")
def auth_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """A NATS server of this module's own, with every user and permission of libs.nats_auth."""
    server = NatsServer(tmp_path_factory.mktemp("auth-nats"), passwords=generate_passwords())
    server.start()
    yield server
    server.stop()


@dataclass
class Login:
    """One connection as one user, with the asynchronous errors the server sent it."""

    nc: NATS
    errors: list[str] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def error(self, containing: str, timeout: float = 5.0) -> str:
        """The first reported error containing ``containing`` (case-insensitive)."""
        async def wait() -> str:
            while True:
                found = [e for e in self.errors if containing.lower() in e.lower()]
                if found:
                    return found[0]
                self._arrived.clear()
                await self._arrived.wait()

        return await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def login(auth_nats: NatsServer) -> AsyncIterator[Callable[[str], Awaitable[Login]]]:
    opened: list[Login] = []

    async def _login(user: str) -> Login:
        assert auth_nats.passwords is not None
        holder: list[Login] = []

        async def on_error(exc: Exception) -> None:
            holder[0].errors.append(str(exc))
            holder[0]._arrived.set()

        nc = await nats.connect(
            auth_nats.url, allow_reconnect=False, error_cb=on_error,
            **connect_options(user, auth_nats.passwords[user]),
        )
        holder.append(Login(nc))
        opened.append(holder[0])
        return holder[0]

    yield _login
    for conn in opened:
        await conn.nc.close()


class Ping(BaseModel):
    n: int


class Pong(BaseModel):
    n: int
    by: str


def _device(org: uuid.UUID) -> Actor:
    return Actor(user_id="device-1", organization_id=org, role=None, type=ActorType.DEVICE)


async def test_a_gateway_command_reaches_the_service_and_its_reply_comes_back(
    login, signer: ContextSigner, context_keys
):
    gateway, scanning = await login("gateway"), await login("scanning")
    router = CommandRouter("scanning", ContextVerifier(load_public_keys(context_keys[1])))

    @router.command("ping", Ping, Pong)
    async def ping(ctx, cmd: Ping) -> Pong:
        return Pong(n=cmd.n + 1, by=ctx.actor.user_id)

    await router.start(scanning.nc)
    await flush_in_order(scanning.nc)
    org = uuid.uuid4()
    reply = await CommandClient(gateway.nc, signer).request(
        "vge.cmd.scanning.ping", Ping(n=41), actor=_device(org), org_id=org, correlation_id="c1"
    )
    await router.stop()
    assert reply == {"n": 42, "by": "device-1"}
    assert gateway.errors == [] and scanning.errors == []


@pytest.mark.parametrize("user", ["scanning", "payments", "audit"])
async def test_no_service_may_publish_a_command(login, user: str):
    subject = "vge.cmd.payments.refund_checkout"
    listener, service, gateway = await login("admin"), await login(user), await login("gateway")
    received = await listener.nc.subscribe(subject)
    await flush_in_order(listener.nc)

    await service.nc.publish(subject, b"forged")
    await flush_in_order(service.nc)
    assert "permissions violation for publish" in await service.error(subject)
    # the server refused the forged message before it sent the error; a message the gateway
    # publishes after that is the first one the listener gets
    await gateway.nc.publish(subject, b"from the gateway")
    await flush_in_order(gateway.nc)
    first = await received.next_msg(timeout=5)
    assert first.data == b"from the gateway"


async def test_a_service_cannot_listen_to_another_services_commands_or_replies(login):
    scanning, gateway = await login("scanning"), await login("gateway")

    async def steal(msg) -> None:
        await msg.respond(b"stolen")

    await scanning.nc.subscribe("vge.cmd.payments.>", cb=steal)
    assert "permissions violation for subscription" in await scanning.error("vge.cmd.payments.>")
    await scanning.nc.subscribe("_INBOX.>")
    assert "permissions violation for subscription" in await scanning.error('"_inbox.>"')
    # nobody serves payments' commands here: the refused subscription never became one
    with pytest.raises(nats.errors.NoRespondersError):
        await gateway.nc.request("vge.cmd.payments.get_checkout", b"{}", timeout=2)
    await gateway.nc.subscribe("vge.cmd.>")
    assert "permissions violation for subscription" in await gateway.error("vge.cmd.>")


async def test_a_service_publishes_its_own_events_and_no_one_elses(login):
    org = uuid.uuid4()
    scanning, admin = await login("scanning"), await login("admin")
    js = scanning.nc.jetstream()
    await ensure_streams(js)
    ack = await js.publish(f"vge.evt.{org}.scanning.scan.accepted", b"{}")
    assert ack.stream == EVENTS_STREAM

    forged = f"vge.evt.{org}.payments.ticket.issued"
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):  # refused: no ack ever comes
        await js.publish(forged, b"{}", timeout=1)
    assert "permissions violation for publish" in await scanning.error(forged)
    with pytest.raises(nats.js.errors.NotFoundError):
        await admin.nc.jetstream().get_last_msg(EVENTS_STREAM, forged)
    last = await admin.nc.jetstream().get_last_msg(EVENTS_STREAM, f"vge.evt.{org}.scanning.>")
    assert last.subject == f"vge.evt.{org}.scanning.scan.accepted"


@pytest.mark.parametrize("user", ["gateway", "scanning", "payments", "audit"])
async def test_every_service_can_bring_the_streams_to_its_settings(login, user: str):
    # a changed setting (a duplicate window here; a replica count on a cluster) is an update,
    # which reads the stream's replica count first: it must not be refused to any service
    js = (await login(user)).nc.jetstream(timeout=2)
    await ensure_streams(js, duplicate_window=60.0)
    await ensure_streams(js)
    for stream in (EVENTS_STREAM, DEAD_LETTER_STREAM):
        assert (await js.stream_info(stream)).config.duplicate_window == 120.0


async def test_a_service_reads_only_through_its_own_consumers(login):
    scanning = await login("scanning")
    js = scanning.nc.jetstream(timeout=1)
    # another service's durable (taking events away from the audit log) ...
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await js.pull_subscribe("vge.evt.>", durable="audit", stream=EVENTS_STREAM)
    assert "$js.api.consumer.info.vge_events.audit" in await scanning.error("consumer.info")
    # ... or its own durable on subjects outside its filter: refused too
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await js.pull_subscribe("vge.evt.>", durable="scanning-registry", stream=EVENTS_STREAM)
    assert await scanning.error("consumer.create.vge_events.scanning-registry.vge.evt.>")


async def test_the_gateways_feeds_work_under_its_user(login):
    """SSE occupancy from scanning's events, and the revocation broadcast among replicas."""
    org, event_id = uuid.uuid4(), uuid.uuid4()
    replica1, replica2 = await login("gateway"), await login("gateway")
    scanning = await login("scanning")
    feed = OccupancyFeed(replica1.nc)
    queue = await feed.watch(org, event_id)
    await flush_in_order(replica1.nc)
    js = scanning.nc.jetstream()
    await ensure_streams(js)
    changed = Envelope(type="occupancy.changed", org_id=org, actor=Actor.system("scanning", org),
                       correlation_id="occ", data={"event_id": str(event_id), "inside": 1})
    await js.publish(f"vge.evt.{org}.scanning.occupancy.changed", changed.to_bytes())
    assert (await asyncio.wait_for(queue.get(), 5))["inside"] == 1

    forgotten: asyncio.Queue[str] = asyncio.Queue()
    listening = RevocationBroadcast(replica2.nc, forgotten.put_nowait)
    await listening.start()
    await flush_in_order(replica2.nc)
    await RevocationBroadcast(replica1.nc, lambda _: None).announce("key-1")
    try:
        assert await asyncio.wait_for(forgotten.get(), 5) == "key-1"
    except TimeoutError:  # (failed once in CI, not reproduced since: say what each side saw)
        raise AssertionError(
            f"broadcast not received in 5 s; errors {replica1.errors} {replica2.errors}; "
            f"sent {replica1.nc.stats}; received {replica2.nc.stats}"
        ) from None
    assert replica1.errors == replica2.errors == scanning.errors == []


@pytest.mark.parametrize(
    "credentials",
    [{"user": "mallory", "password": "x" * 24},
     {"user": "scanning", "password": "not-its-password"},
     {}],
    ids=["unknown user", "bad password", "no login"],
)
async def test_no_connection_without_a_valid_login(auth_nats: NatsServer, credentials):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(auth_nats.url, allow_reconnect=False, connect_timeout=2, **credentials)


async def _eventually(check: Callable[[], Awaitable[object]], timeout: float = 20.0) -> object:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {check}")
        await asyncio.sleep(0.05)


async def test_the_real_services_work_under_their_own_users(
    auth_nats: NatsServer, start_service, login, signer: ContextSigner, admin_dsn: str
):
    """payments' events -> scanning's registry consumer; gateway's scan -> scanning's outbox
    relay -> audit's consumer -> gateway's audit query; poison -> both dead-letter queues."""
    assert auth_nats.passwords is not None

    def as_user(user: str) -> dict[str, str]:
        return {"nats_url": auth_nats.url, "nats_user": user,
                "nats_password": auth_nats.passwords[user]}

    await start_service(build_scanning, **as_user("scanning"))
    await start_service(build_audit, **as_user("audit"))
    payments, gateway, admin = await login("payments"), await login("gateway"), await login("admin")
    commands = CommandClient(gateway.nc, signer, timeout=5)

    org, event_id, code = uuid.uuid4(), uuid.uuid4(), f"TKT-{uuid.uuid4().hex}"
    now, system = datetime.now(UTC), Actor.system("payments", org)
    created = EventCreated(
        event_id=event_id, name="Auth Fest", starts_at=now + timedelta(hours=1),
        ends_at=now + timedelta(hours=6), capacity=100, reentry_allowed=False, zones=[],
        ticket_types=[TicketTypeInfo(code="GA", name="GA", price=1000, quantity=100, zones=[])],
    ).envelope(org, system, "seed")
    issued = TicketIssued(ticket_code=code, event_id=event_id, ticket_type="GA", issued_at=now
                          ).envelope(org, system, "seed")
    pjs = payments.nc.jetstream()
    for env in (created, issued):
        await pjs.publish(f"vge.evt.{org}.payments.{env.type}", env.to_bytes(),
                          headers={"Nats-Msg-Id": str(env.event_id)})

    db = await asyncpg.connect(admin_dsn)
    try:
        await _eventually(lambda: db.fetchval(
            "SELECT count(*) = 1 FROM scanning.tickets WHERE organization_id = $1", org))
    finally:
        await db.close()
    decision = await commands.request(
        "vge.cmd.scanning.scan",
        {"event_id": str(event_id), "ticket_code": code, "direction": "entry", "gate": "A",
         "nonce": uuid.uuid4().hex},
        actor=_device(org), org_id=org, correlation_id="auth-scan",
    )
    assert decision["result"] == "accepted"

    owner = Actor(user_id="owner-1", organization_id=org, role=Role.OWNER, type=ActorType.USER)

    async def audited_actions() -> set[str]:
        page = await commands.request("vge.cmd.audit.query", {}, actor=owner, org_id=org,
                                      correlation_id="auth-query")
        return {r["action"] for r in page["records"]}

    # the scan.accepted record can only come from scanning's outbox relay through JetStream
    await _eventually(lambda: _superset(audited_actions, {"event.created", "ticket.issued",
                                                          "scan.accepted"}))

    poison = f"vge.evt.{org}.payments.ticket.issued"
    await pjs.publish(poison, b"not an envelope", headers={"Nats-Msg-Id": f"poison-{org}"})
    ajs = admin.nc.jetstream()

    async def dead_letter(consumer: str) -> object:
        try:
            msg = await ajs.get_last_msg(DEAD_LETTER_STREAM, f"vge.dlq.{consumer}")
        except nats.js.errors.NotFoundError:
            return None
        return msg.headers and msg.headers.get(DLQ_SUBJECT_HEADER) == poison

    assert await _eventually(lambda: dead_letter("scanning-registry"))
    assert await _eventually(lambda: dead_letter("audit"))
    assert payments.errors == [] and gateway.errors == []


async def _superset(get: Callable[[], Awaitable[set[str]]], wanted: set[str]) -> bool:
    return wanted <= await get()


def _check_config(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_nats_binary(), "-t", "-c", str(conf)], env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize("conf", ["nats.conf", "nats-cluster.conf"])
def test_the_deploy_configs_are_valid_and_need_every_password(conf: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    env.update({password_variable(user): f"secret-of-{user}" for user in USERS})
    env.update(VGE_NATS_SERVER_NAME="nats-1", VGE_NATS_ROUTE_PASSWORD="route-secret",
               VGE_NATS_ROUTES="[nats-route://route:route-secret@nats-1:6222]")
    ok = _check_config(DEPLOY / conf, env)
    assert ok.returncode == 0, ok.stderr
    del env[password_variable("audit")]
    missing = _check_config(DEPLOY / conf, env)
    assert missing.returncode != 0 and password_variable("audit") in missing.stderr


def test_vge_secrets_makes_a_deployment_the_deploy_configs_and_the_services_accept():
    out = subprocess.run([sys.executable, "-m", "libs.cli", "secrets"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    secrets = dict(line.split("=", 1) for line in out.splitlines() if line and not line.startswith("#"))
    assert set(secrets) == {"VGE_CONTEXT_PRIVATE_KEY", "VGE_CONTEXT_PUBLIC_KEYS", "VGE_DB_ROLE_PASSWORD",
                            "VGE_NATS_ROUTE_PASSWORD", *(password_variable(u) for u in USERS)}
    # the pair signs and verifies
    signer = ContextSigner(load_private_key(secrets["VGE_CONTEXT_PRIVATE_KEY"]))
    org = uuid.uuid4()
    _, header = signer.issue(_device(org), org, "vge.cmd.scanning.scan", "c")
    verifier = ContextVerifier(load_public_keys(secrets["VGE_CONTEXT_PUBLIC_KEYS"]))
    assert verifier.verify(header, "vge.cmd.scanning.scan").correlation_id == "c"
    # nats-server takes every password from the environment as it is
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    env.update(secrets, VGE_NATS_SERVER_NAME="nats-1",
               VGE_NATS_ROUTES=f"[nats-route://route:{secrets['VGE_NATS_ROUTE_PASSWORD']}@nats-1:6222]")
    for conf in ("nats.conf", "nats-cluster.conf"):
        checked = _check_config(DEPLOY / conf, env)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize("password", ["-r4JKWtcSMlVMCRkIuJgvd1shE4Vb9RO", "7-GoIjyWDmrgFIht0av5Mq9u-62GecKs"])
def test_a_password_nats_server_would_parse_as_a_number_or_a_date_stops_it(password: str):
    # why generate_password makes letters and digits only (both drawn from token_urlsafe)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    env.update({password_variable(user): generate_password() for user in USERS})
    env[password_variable("scanning")] = password
    checked = _check_config(DEPLOY / "nats.conf", env)
    assert checked.returncode != 0 and "could not be parsed" in checked.stderr + checked.stdout
