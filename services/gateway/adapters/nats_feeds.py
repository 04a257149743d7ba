"""Live occupancy for SSE clients, and the revocation broadcast between gateway replicas.

Both are plain core NATS subscriptions: an ``occupancy.changed`` event published to JetStream is
delivered to core subscribers of its subject too, and a revocation needs no durability (every
replica also bounds its credential cache by time).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any, Callable
from uuid import UUID

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.envelope import Envelope
from libs.log import get_logger
from libs.subjects import event as event_subject

__all__ = ["OccupancyFeed", "RevocationBroadcast", "REVOCATION_SUBJECT", "RESYNC"]

log = get_logger(__name__)

REVOCATION_SUBJECT = "vge.gw.credential.revoked"
_QUEUE_SIZE = 32
# put in every watcher's queue when the connection is back from a disconnect: the changes
# published meanwhile were missed, so the watcher reads the current value again
RESYNC: dict[str, Any] = {"resync": True}


class OccupancyFeed:
    """One NATS subscription per tenant being watched, fanned out to each client's queue."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._subs: dict[UUID, Subscription] = {}
        self._watchers: dict[UUID, dict[UUID, set[asyncio.Queue[dict[str, Any]]]]] = {}
        self._lock = asyncio.Lock()

    async def watch(self, org: UUID, event_id: UUID) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives every ``occupancy.changed`` payload of ``event_id``."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_QUEUE_SIZE)
        async with self._lock:
            if org not in self._subs:
                subject = event_subject(org, "scanning", "occupancy.changed")
                self._subs[org] = await self._nc.subscribe(subject, cb=self._deliver)
                self._watchers[org] = defaultdict(set)
            self._watchers[org][event_id].add(queue)
        return queue

    async def unwatch(self, org: UUID, event_id: UUID, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop delivering to ``queue``; the tenant's subscription ends with its last watcher."""
        async with self._lock:
            watchers = self._watchers.get(org)
            if watchers is None:
                return
            watchers[event_id].discard(queue)
            if not watchers[event_id]:
                del watchers[event_id]
            if not watchers:
                del self._watchers[org]
                sub = self._subs.pop(org)
                try:
                    await sub.unsubscribe()
                except Exception:  # noqa: BLE001 - the connection may be closing
                    pass

    async def resync(self) -> None:
        """Tell every watcher to read the current value again (see ``RESYNC``)."""
        for watchers in self._watchers.values():
            for queues in watchers.values():
                for queue in queues:
                    _put_latest(queue, RESYNC)

    @property
    def watching(self) -> int:
        """How many client queues are open (for metrics and tests)."""
        return sum(len(q) for w in self._watchers.values() for q in w.values())

    async def _deliver(self, msg: Msg) -> None:
        try:
            envelope = Envelope.from_bytes(msg.data)
            event_id = UUID(str(envelope.data["event_id"]))
        except Exception as exc:  # noqa: BLE001 - a bad event must not end the feed
            log.warning("occupancy_event_unreadable", error=repr(exc))
            return
        for queue in list(self._watchers.get(envelope.org_id, {}).get(event_id, ())):
            _put_latest(queue, envelope.data)


def _put_latest(queue: asyncio.Queue[dict[str, Any]], item: dict[str, Any]) -> None:
    if queue.full():  # a slow client gets the latest values, not a growing backlog
        queue.get_nowait()
    queue.put_nowait(item)


class RevocationBroadcast:
    """Tells every gateway replica to forget a revoked credential at once."""

    def __init__(self, nc: NATS, forget: Callable[[str], None]) -> None:
        self._nc = nc
        self._forget = forget
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Listen for revocations from the other replicas (and this one)."""
        self._sub = await self._nc.subscribe(REVOCATION_SUBJECT, cb=self._on_revoked)

    async def stop(self) -> None:
        """Stop listening."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001
                pass

    async def announce(self, credential_id: str) -> None:
        """Forget ``credential_id`` here and tell the other replicas."""
        self._forget(credential_id)
        try:
            await self._nc.publish(REVOCATION_SUBJECT, json.dumps({"credential_id": credential_id}).encode())
        except Exception as exc:  # noqa: BLE001 - the cache TTL still bounds it
            log.warning("revocation_broadcast_failed", error=repr(exc))

    async def _on_revoked(self, msg: Msg) -> None:
        try:
            self._forget(str(json.loads(msg.data)["credential_id"]))
        except Exception as exc:  # noqa: BLE001
            log.warning("revocation_unreadable", error=repr(exc))
