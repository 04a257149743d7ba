"""``flush_in_order``: once it returns, the server has the subscriptions made before it, so a
message published at once on another connection reaches them (what a plain nats-py ``flush()``
does not promise: its PING can overtake a SUB still queued for the flusher)."""

from __future__ import annotations

import asyncio
import uuid

import nats
from nats.aio.msg import Msg

from libs.commands import flush_in_order


def _record_writes(nc) -> list[bytes]:
    """Every command ``nc`` writes to its socket from now on, in order (the transport is
    nats-py's own: this is the one place a test looks at it, to see the order on the wire)."""
    wire: list[bytes] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines

    def recorded_write(data: bytes) -> None:
        wire.append(bytes(data))
        write(data)

    def recorded_writelines(chunks: list[bytes]) -> None:
        wire.extend(bytes(c) for c in chunks)
        writelines(chunks)

    transport.write, transport.writelines = recorded_write, recorded_writelines
    return wire


async def test_the_ping_goes_behind_the_subscription_it_confirms(nc, nats_url):
    subject = f"vge.test.flush.{uuid.uuid4().hex}"
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        received.put_nowait(msg.data)

    wire = _record_writes(nc)
    await nc.subscribe(subject, cb=on_message)
    await flush_in_order(nc)
    sub_at = next(i for i, cmd in enumerate(wire) if cmd.startswith(b"SUB " + subject.encode()))
    assert wire.index(b"PING\r\n") > sub_at, wire

    other = await nats.connect(nats_url)
    try:
        await other.publish(subject, b"revoked")
        await other.flush()
        assert await asyncio.wait_for(received.get(), 5) == b"revoked"
    finally:
        await other.close()
