"""A service refuses any command whose signed context is missing, forged, expired or tampered."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from libs.actor import Actor, ActorType, Role
from libs.commands import STATUS_HEADER, CommandClient, CommandRouter
from libs.context import (
    CONTEXT_HEADER,
    CommandContext,
    ContextSigner,
    ContextVerifier,
    generate_key_pair,
    load_private_key,
    load_public_keys,
)
from libs.errors import InvalidInput, Unauthenticated
from libs.subjects import command


class Echo(BaseModel):
    """Test command."""

    text: str


class Echoed(BaseModel):
    """Test reply."""

    text: str
    actor: str
    org_id: str


ORG = uuid.uuid4()
ACTOR = Actor(user_id="u-1", organization_id=ORG, role=Role.ADMIN, type=ActorType.USER)


@pytest.fixture
async def echo_service(nc: NATS, subject_prefix: str, context_keys: tuple[str, str]):
    router = CommandRouter(subject_prefix, ContextVerifier(load_public_keys(context_keys[1])))
    calls: list[CommandContext] = []

    @router.command("echo", Echo, Echoed)
    async def echo(ctx: CommandContext, req: Echo) -> Echoed:
        calls.append(ctx)
        return Echoed(text=req.text, actor=ctx.actor.user_id, org_id=str(ctx.org_id))

    await router.start(nc)
    yield command(subject_prefix, "echo"), calls
    await router.stop()


async def _raw(nc: NATS, subject: str, header: str | None, body: bytes = b'{"text":"hi"}'):
    headers = {CONTEXT_HEADER: header} if header is not None else None
    reply = await nc.request(subject, body, timeout=2, headers=headers)
    return reply.headers.get(STATUS_HEADER), json.loads(reply.data)


async def test_valid_context_is_served(nc, echo_service, signer):
    subject, calls = echo_service
    reply = await CommandClient(nc, signer).request(
        subject, Echo(text="hi"), actor=ACTOR, org_id=ORG, correlation_id="corr-1"
    )
    assert reply == {"text": "hi", "actor": "u-1", "org_id": str(ORG)}
    assert calls[0].correlation_id == "corr-1"


async def test_unsigned_command_is_refused(nc, echo_service):
    subject, calls = echo_service
    status, body = await _raw(nc, subject, None)
    assert (status, body["error"], body["extra"]["reason"]) == ("error", "unauthenticated", "missing")
    assert calls == []


async def test_forged_context_is_refused(nc, echo_service, signer):
    subject, calls = echo_service
    forger = ContextSigner(load_private_key(generate_key_pair()[0]))
    _, header = forger.issue(ACTOR, ORG, subject, "c")
    # even when the forger claims the trusted key's id
    payload, sig, _ = header.split(".")
    for forged in (header, f"{payload}.{sig}.{signer.key_id}"):
        status, body = await _raw(nc, subject, forged)
        assert body["error"] == "unauthenticated"
        assert body["extra"]["reason"] in ("unknown_key", "bad_signature")
    assert calls == []


async def test_expired_context_is_refused(nc, echo_service, context_keys):
    subject, calls = echo_service
    past = ContextSigner(
        load_private_key(context_keys[0]), clock=lambda: datetime.now(UTC) - timedelta(minutes=5)
    )
    _, header = past.issue(ACTOR, ORG, subject, "c", ttl_seconds=30)
    status, body = await _raw(nc, subject, header)
    assert (body["error"], body["extra"]["reason"]) == ("unauthenticated", "expired")
    assert calls == []


async def test_tampered_context_is_refused(nc, echo_service, signer):
    subject, calls = echo_service
    _, header = signer.issue(
        Actor(user_id="u-2", organization_id=ORG, role=Role.VIEWER, type=ActorType.USER),
        ORG, subject, "c",
    )
    payload, sig, kid = header.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["actor"]["role"] = "owner"  # privilege escalation attempt
    tampered = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    status, body = await _raw(nc, subject, f"{tampered}.{sig}.{kid}")
    assert (body["error"], body["extra"]["reason"]) == ("unauthenticated", "bad_signature")
    assert calls == []


async def test_context_for_another_subject_is_refused(nc, echo_service, signer):
    subject, calls = echo_service
    _, header = signer.issue(ACTOR, ORG, "vge.cmd.payments.refund", "c")
    status, body = await _raw(nc, subject, header)
    assert (body["error"], body["extra"]["reason"]) == ("unauthenticated", "wrong_subject")
    assert calls == []


async def test_replayed_context_is_refused(nc, echo_service, signer):
    subject, calls = echo_service
    _, header = signer.issue(ACTOR, ORG, subject, "c")
    assert (await _raw(nc, subject, header))[0] == "ok"
    status, body = await _raw(nc, subject, header)
    assert (body["error"], body["extra"]["reason"]) == ("unauthenticated", "replayed")
    assert len(calls) == 1


async def test_bad_body_gets_typed_error_and_service_keeps_serving(nc, echo_service, signer):
    subject, calls = echo_service
    client = CommandClient(nc, signer)
    for body in ({"nope": 1}, {"text": 5}):
        with pytest.raises(InvalidInput):
            await client.request(subject, body, actor=ACTOR, org_id=ORG, correlation_id="c")
    _, header = signer.issue(ACTOR, ORG, subject, "c")
    status, reply = await _raw(nc, subject, header, body=b"\xff not json")
    assert (status, reply["error"]) == ("error", "invalid_input")
    assert (await client.request(subject, Echo(text="ok"), actor=ACTOR, org_id=ORG, correlation_id="c"))["text"] == "ok"
    with pytest.raises(Unauthenticated):
        await CommandClient(nc, ContextSigner(load_private_key(generate_key_pair()[0]))).request(
            subject, Echo(text="x"), actor=ACTOR, org_id=ORG, correlation_id="c"
        )
