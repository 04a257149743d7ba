"""Commands over core NATS request/reply (design §3): the service side and the caller side.

``CommandRouter`` serves ``vge.cmd.<service>.<command>`` in the service's queue group. For every
request it verifies the signed context *before anything else*, parses the body into the
command's pydantic model, calls the handler and replies with the result model, or with an
``ErrorReply`` (header ``Vge-Status: error``) carrying a stable code. A bad request never
crashes the subscription. ``CommandClient`` is the caller side (the gateway, tests, CLIs).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError

from libs.actor import Actor
from libs.contracts import Command, dump_json_in_slices
from libs.context import CONTEXT_HEADER, CommandContext, ContextSigner, ContextVerifier
from libs.errors import (
    Conflict,
    DomainError,
    ErrorCode,
    ErrorReply,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from libs.log import bound_correlation, get_logger
from libs.subjects import command as command_subject
from libs.subjects import command_queue

__all__ = [
    "CommandRouter", "CommandClient", "Route", "STATUS_HEADER", "CORRELATION_HEADER", "flush_in_order",
]

log = get_logger(__name__)

STATUS_HEADER = "Vge-Status"
CORRELATION_HEADER = "Vge-Correlation-Id"

# A request at least this big is parsed with the event loop given back between slices of its
# long lists (an offline upload of 10,000 scans is ~2.5 MB): a gate's scan is ~0.5 KB.
PARSE_IN_SLICES_FROM = 64 * 1024

Req = TypeVar("Req", bound=BaseModel)
Rep = TypeVar("Rep", bound=BaseModel)
Handler = Callable[[CommandContext, Any], Awaitable[BaseModel]]

COMMANDS = Counter("vge_commands_total", "Commands handled", ["subject", "outcome"])
COMMAND_SECONDS = Histogram(
    "vge_command_seconds",
    "Command handling time",
    ["subject"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


async def flush_in_order(nc: NATS, timeout: float = 5.0) -> None:
    """Return once the server has processed every command sent on ``nc`` so far, subscriptions
    above all: after it, a message published on any connection reaches them.

    ``nc.flush()`` alone does not promise that (nats-py 2.16): it writes its PING straight to the
    socket, ahead of the commands its flusher task has not written yet, so the PONG can come back
    before the server has seen a SUB made just before it. A broadcast published right after was
    lost that way (a test, about one full run in fifteen). Waiting until the flusher has written
    everything puts the PING behind those commands."""
    async with asyncio.timeout(timeout):
        while nc.pending_data_size:
            await asyncio.sleep(0.001)
        await nc.flush(timeout)


async def _parse(model: type[Req], body: bytes) -> Req:
    """The request as its command model, a big one a slice at a time (``Command.parse_in_slices``)."""
    if len(body) >= PARSE_IN_SLICES_FROM and issubclass(model, Command):
        return await model.parse_in_slices(body)  # type: ignore[return-value]
    return model.model_validate_json(body)


@dataclass(frozen=True)
class Route(Generic[Req, Rep]):
    """One command: its subject, request and reply models, and handler (also feeds AsyncAPI)."""

    subject: str
    request: type[Req]
    reply: type[Rep]
    handler: Handler
    summary: str


class _ReplayGuard:
    """Refuses a signed context seen before while it is still valid (a replayed message).

    Forgets each context as it expires, in expiry order (a heap): every request does a little
    of the forgetting. A periodic sweep instead rebuilt the whole map, every context of the
    last ~30 s (30,000 at 1,000 commands/s), in one go, and each command waiting meanwhile
    waited milliseconds longer."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._seen: set[str] = set()
        self._expiries: list[tuple[float, str]] = []  # a heap: the next to expire first

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, message_id: str, expires_at: float) -> bool:
        """True the first time ``message_id`` is seen (before ``expires_at``)."""
        now = self._clock()
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            self._seen.discard(heapq.heappop(expiries)[1])
        if message_id in self._seen:
            return False
        self._seen.add(message_id)
        heapq.heappush(expiries, (expires_at, message_id))
        return True


class CommandRouter:
    """Serves one service's commands; replicas share them through the queue group."""

    def __init__(self, service: str, verifier: ContextVerifier, *, max_in_flight: int = 512):
        self.service = service
        self._verifier = verifier
        self._routes: dict[str, Route[Any, Any]] = {}
        self._subs: list[Subscription] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._replays = _ReplayGuard()
        # each route's metric children, looked up once (``labels()`` costs ~1 us per call)
        self._handled: dict[str, Any] = {}
        self._seconds: dict[str, Any] = {}

    @property
    def routes(self) -> list[Route[Any, Any]]:
        """Every registered command."""
        return list(self._routes.values())

    def command(
        self, name: str, request: type[Req], reply: type[Rep]
    ) -> Callable[[Callable[[CommandContext, Req], Awaitable[Rep]]], Callable[..., Awaitable[Rep]]]:
        """Register ``handler(ctx, request) -> reply`` for ``vge.cmd.<service>.<name>``."""

        def register(fn: Callable[[CommandContext, Req], Awaitable[Rep]]) -> Callable[..., Awaitable[Rep]]:
            subject = command_subject(self.service, name)
            self._routes[subject] = Route(subject, request, reply, fn, (fn.__doc__ or "").strip())
            self._handled[subject] = COMMANDS.labels(subject, "ok")
            self._seconds[subject] = COMMAND_SECONDS.labels(subject)
            return fn

        return register

    async def start(self, nc: NATS) -> None:
        """Subscribe every route in the service's queue group."""
        for subject in self._routes:
            self._subs.append(
                await nc.subscribe(subject, queue=command_queue(self.service), cb=self._dispatch)
            )

    async def stop(self) -> None:
        """Stop taking requests and let the ones in flight finish."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - connection may be closing
                pass
        self._subs.clear()
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=5.0)

    async def _dispatch(self, msg: Msg) -> None:
        # nats-py runs one callback at a time per subscription: hand each request to its own
        # task so a slow one does not hold up the rest.
        await self._slots.acquire()
        task = asyncio.create_task(self.handle(msg))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def handle(self, msg: Msg) -> None:
        """Verify, parse, run and reply to one request. Never raises."""
        started = time.perf_counter()
        route = self._routes.get(msg.subject)
        headers = msg.headers or {}
        correlation_id = headers.get(CORRELATION_HEADER)
        with bound_correlation(correlation_id, subject=msg.subject):
            try:
                if route is None:
                    raise NotFound(f"no command at {msg.subject}")
                ctx = self._verifier.verify(headers.get(CONTEXT_HEADER), msg.subject)
                correlation_id = ctx.correlation_id
                if not self._replays.first_time(ctx.message_id, ctx.expires_at.timestamp()):
                    raise Unauthenticated("context already used", reason="replayed")
                try:
                    request = await _parse(route.request, msg.data)
                except ValidationError as exc:
                    raise InvalidInput(
                        "request does not match the command schema",
                        errors=exc.errors(include_url=False, include_context=False, include_input=False),
                    ) from exc
                with bound_correlation(ctx.correlation_id, actor=ctx.actor.user_id, org_id=ctx.org_id):
                    result = await route.handler(ctx, request)
                await self._reply(msg, await dump_json_in_slices(result), "ok", correlation_id)
                self._handled[msg.subject].inc()
            except DomainError as exc:
                log.info("command_refused", code=exc.code.value, detail=exc.detail)
                await self._reply(
                    msg, exc.to_reply(correlation_id).model_dump_json().encode(), "error", correlation_id
                )
                COMMANDS.labels(msg.subject, exc.code.value).inc()
            except Exception as exc:  # noqa: BLE001 - reply, log, keep serving
                log.exception("command_failed", error=repr(exc))
                body = ErrorReply(
                    error=ErrorCode.INTERNAL, detail="internal error", correlation_id=correlation_id
                )
                await self._reply(msg, body.model_dump_json().encode(), "error", correlation_id)
                COMMANDS.labels(msg.subject, "internal").inc()
            finally:
                seconds = self._seconds.get(msg.subject) or COMMAND_SECONDS.labels(msg.subject)
                seconds.observe(time.perf_counter() - started)

    @staticmethod
    async def _reply(msg: Msg, body: bytes, status: str, correlation_id: str | None) -> None:
        if not msg.reply:
            return  # a publish without a reply subject: nobody is waiting
        headers = {STATUS_HEADER: status}
        if correlation_id:
            headers[CORRELATION_HEADER] = correlation_id
        try:
            await msg._client.publish(msg.reply, body, headers=headers)
        except Exception as exc:  # noqa: BLE001 - caller times out and retries (idempotent)
            log.warning("reply_failed", error=repr(exc))


_ERRORS: dict[ErrorCode, type[DomainError]] = {
    ErrorCode.INVALID_INPUT: InvalidInput,
    ErrorCode.UNAUTHENTICATED: Unauthenticated,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.UNAVAILABLE: Unavailable,
}


class CommandClient:
    """Sends signed commands and turns error replies back into typed exceptions."""

    def __init__(self, nc: NATS, signer: ContextSigner, *, timeout: float = 2.0, ttl: float = 30.0):
        self._nc = nc
        self._signer = signer
        self._timeout = timeout
        self._ttl = ttl

    def signed_headers(self, subject: str, *, actor: Actor, org_id: Any, correlation_id: str) -> dict[str, str]:
        """The headers of a command to ``subject``: the signed context and the correlation id
        (for a caller that sends the message itself, e.g. a load generator)."""
        _, header = self._signer.issue(
            actor=actor, org_id=org_id, subject=subject, correlation_id=correlation_id,
            ttl_seconds=self._ttl,
        )
        return {CONTEXT_HEADER: header, CORRELATION_HEADER: correlation_id}

    async def request(
        self,
        subject: str,
        body: BaseModel | dict[str, Any],
        *,
        actor: Actor,
        org_id: Any,
        correlation_id: str,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one command and return the reply's JSON; raises ``DomainError`` on an error reply
        and ``Unavailable`` when no replica answers in time."""
        return json.loads(await self.request_json(subject, body, actor=actor, org_id=org_id,
                                                  correlation_id=correlation_id, timeout=timeout))

    async def request_json(
        self,
        subject: str,
        body: BaseModel | dict[str, Any],
        *,
        actor: Actor,
        org_id: Any,
        correlation_id: str,
        timeout: float | None = None,
    ) -> bytes:
        """``request``, the reply's JSON as it came: for a caller that passes a big reply on
        (an offline upload's 10,000 results) without reading it. A big command is written a
        slice at a time (``dump_json_in_slices``)."""
        payload = (await dump_json_in_slices(body) if isinstance(body, BaseModel)
                   else json.dumps(body).encode())
        try:
            reply = await self._nc.request(
                subject,
                payload,
                timeout=timeout or self._timeout,
                headers=self.signed_headers(subject, actor=actor, org_id=org_id,
                                            correlation_id=correlation_id),
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError) as exc:
            raise Unavailable(f"{subject} did not answer in time") from exc
        if (reply.headers or {}).get(STATUS_HEADER) == "error":
            err = ErrorReply.model_validate_json(reply.data)
            cls = _ERRORS.get(err.error, DomainError)
            raise cls(err.detail, **err.extra)
        return reply.data
