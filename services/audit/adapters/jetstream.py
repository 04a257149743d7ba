"""The audit consumer's backlog, read from JetStream for the lag gauges."""

from __future__ import annotations

import asyncio

from nats.js import JetStreamContext

from libs.log import get_logger
from libs.subjects import EVENTS_STREAM
from services.audit import metrics

__all__ = ["watch_consumer_lag"]

log = get_logger(__name__)


async def watch_consumer_lag(js: JetStreamContext, durable: str, every: float = 2.0) -> None:
    """Every ``every`` seconds, set the pending and ack-pending gauges from the consumer info.

    Runs until cancelled; a failed poll (NATS reconnecting, consumer not created yet) is logged
    and tried again at the next tick.
    """
    while True:
        try:
            info = await js.consumer_info(EVENTS_STREAM, durable, timeout=every)
            metrics.CONSUMER_PENDING.set(info.num_pending or 0)
            metrics.CONSUMER_ACK_PENDING.set(info.num_ack_pending or 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a gauge must never stop the service
            log.debug("consumer_lag_poll_failed", durable=durable, error=repr(exc))
        await asyncio.sleep(every)
