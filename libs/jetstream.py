"""JetStream setup and the one way to consume events (design §3).

``ensure_streams`` declares the event stream and the dead-letter stream in one place (services
bind to them, never redeclare: see shared/notes/faststream-nats.md). ``EventConsumer`` is a
durable pull consumer with explicit ack, bounded redelivery with backoff, and dead-lettering
with the reason. Idempotency is the handler's part: it records the event id in the same
transaction as its change (``libs.db.mark_processed``).

A consumer whose work is cheaper in bulk (one transaction for many events, e.g. the audit log)
also passes a ``batch_handler``: each fetched batch then goes to it at once, and only when that
fails is every message of the batch retried alone through ``handler``, so one poison event is
isolated and dead-lettered while the rest of its batch is applied. Batch mode pulls with
:class:`PullBatches` instead of nats-py's ``fetch``, whose per-message cost would dominate.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Awaitable, Callable, Sequence

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from libs.background import cancel_and_wait
from libs.envelope import Envelope
from libs.log import bound_correlation, get_logger
from libs.subjects import (
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECTS,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    dead_letter,
)

__all__ = [
    "ensure_streams",
    "EventConsumer",
    "EventHandler",
    "BatchEventHandler",
    "PullBatches",
    "DLQ_REASON_HEADER",
    "DLQ_SUBJECT_HEADER",
    "DLQ_CONSUMER_HEADER",
    "DLQ_DELIVERIES_HEADER",
    "retry_delay",
]

log = get_logger(__name__)

DLQ_REASON_HEADER = "Vge-Dead-Letter-Reason"
DLQ_SUBJECT_HEADER = "Vge-Original-Subject"
DLQ_CONSUMER_HEADER = "Vge-Consumer"
DLQ_DELIVERIES_HEADER = "Vge-Deliveries"

EventHandler = Callable[[Envelope], Awaitable[None]]
BatchEventHandler = Callable[[Sequence[Envelope]], Awaitable[None]]

CONSUMED = Counter("vge_events_consumed_total", "Events handled", ["consumer", "outcome"])
CONSUMER_PENDING = Gauge(
    "vge_consumer_pending",
    "Events in the stream a durable consumer has not fetched yet: its backlog (scanning-registry: "
    "sold tickets the gates do not know yet)",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "vge_consumer_ack_pending", "Events a durable consumer has fetched and not acknowledged yet", ["consumer"]
)
LAG_POLL_SECONDS = 2.0
# JetStream's answer to creating a stream that exists with other settings
STREAM_EXISTS_WITH_OTHER_SETTINGS = 10058
# JetStream's answer when fewer servers are online than the replicas asked for: seen in a
# cluster still forming (a node not yet reported online to the others; once in CI, raising a
# stream to three replicas right after the cluster started)
NO_PLACEMENT = 10005
# how long a stream's creation or update is asked for again before the answer stands
PLACEMENT_WAIT_SECONDS = 15.0


async def ensure_streams(js: JetStreamContext, *, duplicate_window: float = 120.0, replicas: int = 1,
                         placement_wait: float = PLACEMENT_WAIT_SECONDS) -> None:
    """Create or update ``VGE_EVENTS`` and the dead-letter stream (file storage), each kept on
    ``replicas`` servers of a NATS cluster (3 on deploy/nats/nats-cluster.conf: a published
    event is acknowledged once a majority of them has it, and losing one loses nothing).

    A service never lowers a stream's replica count: one started with an older setting (a
    rolling deploy, a restart of an old replica) would otherwise take the redundancy away
    until the next start of a new one. Lowering it is an operator's decision (``nats stream
    edit``).

    Too few servers online for the replicas (``NO_PLACEMENT``), or no answer at all, is asked
    again for up to ``placement_wait`` seconds: a cluster that has just started reports its
    nodes online one by one, and one that has just lost a node elects a new leader (seen in CI:
    a service started right after the first of three nodes stopped, and JetStream did not
    answer a request within 5 s, on a busy machine). Then a missing stream is an error (a
    service cannot run without it), but an existing one that could not be raised is kept as it
    is, with a warning (``stream_replicas_not_raised``), and raised by a later start: a stream
    that works does not stop a service from starting."""
    for name, subjects in ((EVENTS_STREAM, EVENTS_SUBJECTS), (DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS)):
        cfg = StreamConfig(
            name=name,
            subjects=[subjects],
            storage=StorageType.FILE,
            duplicate_window=duplicate_window,
            num_replicas=replicas,
        )
        try:
            await _placed(lambda: js.add_stream(cfg), placement_wait)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_EXISTS_WITH_OTHER_SETTINGS:
                raise
            # exists with other settings: bring it to ours
            current = (await js.stream_info(name)).config.num_replicas or 1
            if current > replicas:
                log.warning("stream_replicas_kept", stream=name, replicas=current, configured=replicas)
                cfg.num_replicas = current
            try:
                await _placed(lambda: js.update_stream(cfg), placement_wait)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != NO_PLACEMENT:
                    raise
                log.warning("stream_replicas_not_raised", stream=name, replicas=current,
                            configured=cfg.num_replicas, error=exc.description)


async def _placed(call: Callable[[], Awaitable[object]], wait: float) -> None:
    """``call()``, asked again every 0.25 s for up to ``wait`` seconds while JetStream answers
    that too few servers are online for the stream's replicas, or does not answer."""
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        try:
            await call()
            return
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != NO_PLACEMENT or asyncio.get_running_loop().time() >= deadline:
                raise
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError):
            if asyncio.get_running_loop().time() >= deadline:
                raise
        await asyncio.sleep(0.25)


def retry_delay(deliveries: int, backoff: Sequence[float]) -> float:
    """Delay before the next try after the ``deliveries``-th failed one."""
    if not backoff:
        return 0.0
    return backoff[min(deliveries, len(backoff)) - 1]


class PullBatches:
    """Pulls a durable consumer's messages in batches, at a fraction of nats-py's cost.

    ``PullSubscription.fetch`` waits for every message with a task and a timer of its own (about
    100 µs of CPU a message on a small machine, more than a batch handler spends on it). This
    sends the same pull request (``$JS.API.CONSUMER.MSG.NEXT``) and collects what JetStream
    delivers in one callback subscription. One request is open at a time: it stays open until
    it has delivered ``batch`` messages or JetStream ends it with a status (408 expired, 409
    refused), so messages published meanwhile arrive without a new request.
    """

    def __init__(self, js: JetStreamContext, stream: str, durable: str) -> None:
        self._nc = js._nc  # the core connection under the JetStream context (no public accessor)
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = self._nc.new_inbox()
        self._sub: Subscription | None = None
        self._buffer: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._open: str | None = None  # reply subject of the open request
        self._open_until = 0.0
        self._due = 0
        self._refused = False
        self._requests = 0

    async def start(self) -> None:
        """Subscribe the inbox the requests are answered on."""
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)

    async def stop(self) -> None:
        """Unsubscribe; messages received but not handed out are nak'ed, so another replica
        gets them now rather than after the ack wait."""
        await _unsubscribe_quietly(self._sub)
        self._sub = None
        while self._buffer:
            await _quietly(self._buffer.popleft().nak())

    async def _on_message(self, msg: Msg) -> None:
        status = (msg.headers or {}).get("Status")
        if status is None:
            # JetStream delivers with the event's own subject: it belongs to the open request
            self._buffer.append(msg)
            self._due -= 1
            if self._due <= 0:
                self._open = None
        elif status != "100" and msg.subject == self._open:  # 100: heartbeat, nothing ends
            self._open = None
            self._refused = status == "409"
            if self._refused:
                reason = msg.headers.get("Description")
                log.warning("pull_refused", api=self._api, description=reason)
        self._arrived.set()

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages as soon as there are any; ``TimeoutError`` after ``timeout``
        seconds without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._arrived.clear()
            if self._buffer:
                await asyncio.sleep(0)  # let the rest of a burst already read join this batch
                return [self._buffer.popleft() for _ in range(min(batch, len(self._buffer)))]
            if self._open is not None and loop.time() > self._open_until + 1.0:
                self._open = None  # never ended (lost in a reconnect): stop waiting for it
            if self._open is None:
                if self._refused:
                    # the consumer refused the last request: ask again after this wait, not now
                    self._refused = False
                    await asyncio.sleep(max(0.0, deadline - loop.time()))
                    raise TimeoutError
                await self._request(batch, timeout)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(self._arrived.wait(), remaining)

    async def _request(self, batch: int, expires: float) -> None:
        self._requests += 1
        reply = f"{self._inbox}.{self._requests}"
        self._open, self._due = reply, batch
        self._open_until = asyncio.get_running_loop().time() + expires
        body = json.dumps({"batch": batch, "expires": int(expires * 1e9)}).encode()
        await self._nc.publish(self._api, body, reply=reply)


class EventConsumer:
    """A durable consumer of ``VGE_EVENTS``; replicas with the same ``durable`` share the work.

    Each message is tried up to ``max_deliver`` times (``nak`` with the backoff delay between
    tries); then, or at once if it is not a valid envelope, it is published to
    ``vge.dlq.<durable>`` with the reason and terminated, so one poison event never blocks the
    stream. The server never gives up by itself (``max_deliver=-1``): giving up is ours, so no
    message is lost without a dead letter, also when a handler crashed the process.

    Optional, both off by default: ``batch_handler`` (see the module docstring; ``concurrency``
    is then the number of batches in flight, so one batch's I/O overlaps the next one's work)
    and ``permanent_errors``, exception types that can never succeed on a retry (e.g. an event
    the handler refuses as invalid); those are dead-lettered at the first failure.
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        durable: str,
        handler: EventHandler,
        filter_subject: str = EVENTS_SUBJECTS,
        max_deliver: int = 5,
        backoff: Sequence[float] = (0.2, 1.0, 5.0, 15.0),
        ack_wait: float = 30.0,
        batch: int = 100,
        concurrency: int = 1,
        batch_handler: BatchEventHandler | None = None,
        permanent_errors: tuple[type[BaseException], ...] = (),
        lag_poll: float = LAG_POLL_SECONDS,
    ) -> None:
        self._js = js
        self.durable = durable
        self._handler = handler
        self._filter = filter_subject
        self._max_deliver = max_deliver
        self._backoff = list(backoff)
        self._ack_wait = ack_wait
        self._batch = batch
        self._concurrency = concurrency
        self._batch_handler = batch_handler
        self._permanent_errors = permanent_errors
        self._task: asyncio.Task[None] | None = None
        self._lag_poll = lag_poll
        self._lag_task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._pull: PullBatches | None = None

    async def start(self) -> None:
        """Bind (creating the durable if needed) and start pulling in the background."""
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=-1,
            ack_wait=self._ack_wait,
            max_ack_pending=max(1000, self._batch * 4),
            filter_subject=self._filter,
        )
        if self._batch_handler is None:
            self._sub = await self._js.pull_subscribe(
                self._filter, durable=self.durable, stream=EVENTS_STREAM, config=config
            )
        else:
            await self._ensure_durable(config)
            self._pull = PullBatches(self._js, EVENTS_STREAM, self.durable)
            await self._pull.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.durable}")
        self._lag_task = asyncio.create_task(self._watch_lag(), name=f"consumer-lag-{self.durable}")

    async def _watch_lag(self) -> None:
        """Every ``lag_poll`` seconds, set this consumer's backlog gauges from its info. A failed
        poll (NATS reconnecting) is tried again at the next tick: a gauge never stops a service."""
        while True:
            try:
                info = await self._js.consumer_info(EVENTS_STREAM, self.durable, timeout=self._lag_poll)
                CONSUMER_PENDING.labels(self.durable).set(info.num_pending or 0)
                CONSUMER_ACK_PENDING.labels(self.durable).set(info.num_ack_pending or 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.debug("consumer_lag_poll_failed", consumer=self.durable, error=repr(exc))
            await asyncio.sleep(self._lag_poll)

    async def _ensure_durable(self, config: ConsumerConfig) -> None:
        # as pull_subscribe does: create with our config if missing, else bind to it as it is
        try:
            await self._js.consumer_info(EVENTS_STREAM, self.durable)
        except nats.js.errors.NotFoundError:
            config.durable_name = config.name = self.durable
            await self._js.add_consumer(EVENTS_STREAM, config=config)

    async def stop(self) -> None:
        """Stop pulling; messages in flight finish, unacked ones are redelivered later."""
        await cancel_and_wait(self._lag_task)
        self._lag_task = None
        await cancel_and_wait(self._task)
        self._task = None
        await _unsubscribe_quietly(self._sub)
        self._sub = None
        if self._pull is not None:
            await self._pull.stop()
            self._pull = None

    async def _run(self) -> None:
        if self._batch_handler is not None:
            await self._run_batches()
            return
        assert self._sub is not None
        sem = asyncio.Semaphore(self._concurrency)
        while True:
            try:
                msgs = await self._sub.fetch(self._batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS down or reconnecting: wait, go on
                log.warning("consumer_fetch_failed", consumer=self.durable, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if self._batch_handler is not None:
                await self.handle_batch(msgs)
            elif self._concurrency == 1:
                for msg in msgs:
                    await self.handle(msg)
            else:

                async def one(m: Msg) -> None:
                    async with sem:
                        await self.handle(m)

                await asyncio.gather(*(one(m) for m in msgs))

    async def _run_batches(self) -> None:
        """Fetch the next batch while earlier ones are still being handled (up to
        ``concurrency`` at once); on stop, let the ones in flight finish."""
        assert self._pull is not None
        slots = asyncio.Semaphore(self._concurrency)
        in_flight: set[asyncio.Task[None]] = set()

        async def handle_then_release(msgs: list[Msg]) -> None:
            try:
                await self.handle_batch(msgs)
            finally:
                slots.release()

        try:
            while True:
                # a slot first: never hold fetched messages we cannot start on (ack wait runs)
                await slots.acquire()
                try:
                    msgs = await self._pull.fetch(self._batch, timeout=1.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    slots.release()
                    continue
                except asyncio.CancelledError:
                    slots.release()
                    raise
                except Exception as exc:  # noqa: BLE001 - NATS down or reconnecting: wait, go on
                    slots.release()
                    log.warning("consumer_fetch_failed", consumer=self.durable, error=repr(exc))
                    await asyncio.sleep(0.5)
                    continue
                task = asyncio.create_task(handle_then_release(msgs))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            if in_flight:
                # shielded: stop() cancels us, but a batch mid-transaction should commit and ack
                _, pending = await asyncio.shield(asyncio.wait(set(in_flight), timeout=10.0))
                for task in pending:
                    task.cancel()

    async def handle(self, msg: Msg) -> None:
        """Handle one delivery: ack, nak with backoff, or dead-letter. Never raises."""
        deliveries = msg.metadata.num_delivered
        try:
            envelope = Envelope.from_bytes(msg.data)
        except (ValidationError, ValueError) as exc:
            await self._dead_letter(msg, f"malformed envelope: {_short(exc)}", deliveries)
            return
        with bound_correlation(
            envelope.correlation_id, event_id=str(envelope.event_id), event_type=envelope.type
        ):
            if deliveries > self._max_deliver:
                # earlier tries never came back (crash, ack timeout): stop trying
                await self._dead_letter(msg, "gave up: no outcome after max deliveries", deliveries)
                return
            try:
                await self._handler(envelope)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a handler failure must not kill the loop
                if isinstance(exc, self._permanent_errors):
                    await self._dead_letter(msg, f"handler refused: {_short(exc)}", deliveries)
                elif deliveries >= self._max_deliver:
                    log.error("event_dead_lettered", consumer=self.durable, error=repr(exc))
                    await self._dead_letter(msg, f"handler failed: {_short(exc)}", deliveries)
                else:
                    delay = retry_delay(deliveries, self._backoff)
                    log.warning(
                        "event_retry", consumer=self.durable, error=repr(exc),
                        deliveries=deliveries, delay=delay,
                    )
                    CONSUMED.labels(self.durable, "retried").inc()
                    await _quietly(msg.nak(delay=delay))
                return
            await _quietly(msg.ack())
            CONSUMED.labels(self.durable, "ok").inc()

    async def handle_batch(self, msgs: Sequence[Msg]) -> None:
        """Handle one fetched batch through ``batch_handler``: ack all when it succeeds, else
        fall back to ``handle`` message by message. Never raises."""
        assert self._batch_handler is not None
        ready: list[tuple[Msg, Envelope]] = []
        for msg in msgs:
            deliveries = msg.metadata.num_delivered
            try:
                envelope = Envelope.from_bytes(msg.data)
            except (ValidationError, ValueError) as exc:
                await self._dead_letter(msg, f"malformed envelope: {_short(exc)}", deliveries)
                continue
            if deliveries > self._max_deliver:
                await self._dead_letter(msg, "gave up: no outcome after max deliveries", deliveries)
                continue
            ready.append((msg, envelope))
        if not ready:
            return
        try:
            await self._batch_handler([envelope for _, envelope in ready])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the culprit instead of failing them all
            log.warning(
                "event_batch_failed", consumer=self.durable, error=repr(exc), size=len(ready)
            )
            for msg, _ in ready:
                await self.handle(msg)
            return
        for msg, _ in ready:
            # one by one: an ack is a buffered publish, a task per ack would cost more than it
            await _quietly(msg.ack())
        CONSUMED.labels(self.durable, "ok").inc(len(ready))

    async def _dead_letter(self, msg: Msg, reason: str, deliveries: int) -> None:
        headers = {
            DLQ_REASON_HEADER: reason[:1000],
            DLQ_SUBJECT_HEADER: msg.subject,
            DLQ_CONSUMER_HEADER: self.durable,
            DLQ_DELIVERIES_HEADER: str(deliveries),
            # one dead letter per stream message, even if we crash and do this twice
            "Nats-Msg-Id": f"dlq:{self.durable}:{msg.metadata.sequence.stream}",
        }
        try:
            await self._js.publish(dead_letter(self.durable), msg.data, headers=headers)
        except Exception as exc:  # noqa: BLE001 - cannot park it: leave it for redelivery
            log.error("dead_letter_failed", consumer=self.durable, error=repr(exc))
            await _quietly(msg.nak(delay=retry_delay(len(self._backoff), self._backoff)))
            return
        CONSUMED.labels(self.durable, "dead_lettered").inc()
        log.error("event_dead_lettered", consumer=self.durable, reason=reason)
        await _quietly(msg.term())


async def _unsubscribe_quietly(sub: Subscription | JetStreamContext.PullSubscription | None) -> None:
    # on shutdown the connection may already be closing: nothing left to undo then
    if sub is None:
        return
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001
        pass


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


async def _quietly(aw: Awaitable[None]) -> None:
    # An ack lost to a dropped connection only means a redelivery; the handler is idempotent.
    try:
        await aw
    except Exception as exc:  # noqa: BLE001
        log.warning("ack_failed", error=repr(exc))
