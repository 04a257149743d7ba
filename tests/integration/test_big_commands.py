"""A big command (an offline upload of 10,000 scans) does not hold up the commands a service
receives while it parses the request and writes the reply: both go a slice at a time."""

from __future__ import annotations

import asyncio
import uuid

from nats.aio.client import Client as NATS
from pydantic import BaseModel

from libs.actor import Actor, ActorType, Role
from libs.commands import CommandClient, CommandRouter
from libs.context import ContextSigner, ContextVerifier, load_public_keys
from libs.contracts import Command, Reply
from libs.subjects import command

ORG = uuid.uuid4()
ACTOR = Actor(user_id="device-1", organization_id=ORG, role=Role.ADMIN, type=ActorType.USER)


class Item(BaseModel):
    """One item of a big command."""

    code: str
    gate: str | None = None
    n: int


class Upload(Command):
    """A big command: many items."""

    items: list[Item]


class Uploaded(Reply):
    """A big reply: an answer per item."""

    items: list[Item]


class Ping(Command):
    """A small command."""

    text: str


class Pong(Reply):
    """Its reply."""

    text: str


async def test_a_command_received_during_a_big_ones_parse_is_served_before_it(
    nc: NATS, subject_prefix: str, context_keys: tuple[str, str], signer: ContextSigner
):
    router = CommandRouter(subject_prefix, ContextVerifier(load_public_keys(context_keys[1])))
    handled: list[str] = []

    @router.command("upload", Upload, Uploaded)
    async def upload(ctx, cmd: Upload) -> Uploaded:
        handled.append("upload")
        return Uploaded(items=cmd.items)

    @router.command("ping", Ping, Pong)
    async def ping(ctx, cmd: Ping) -> Pong:
        handled.append("ping")
        return Pong(text=cmd.text)

    await router.start(nc)
    try:
        client = CommandClient(nc, signer, timeout=10)
        items = [Item(code=f"TKT-{n:06d}", gate=f"G{n % 7}", n=n) for n in range(4_000)]  # ~200 KB

        def send(name: str, body: BaseModel):
            return client.request(command(subject_prefix, name), body, actor=ACTOR, org_id=ORG,
                                  correlation_id=f"big-{name}")

        # sent in this order on one connection, so the service receives the upload first
        uploaded, pong = await asyncio.gather(send("upload", Upload(items=items)),
                                              send("ping", Ping(text="hi")))
    finally:
        await router.stop()
    assert pong == {"text": "hi"}
    assert Uploaded.model_validate(uploaded).items == items  # (its reply written a slice at a time)
    # parsed in one go, the upload's handler ran before the ping was even looked at
    assert handled == ["ping", "upload"]
