"""The public HTTP API (design §7): the one door in.

Every route does the same four things: authenticate the bearer credential (``Authenticator``),
check the policy table for the actor, send the command with a signed context, and map the
reply to HTTP. Errors are ``application/problem+json`` with a stable ``code``.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import re
import time
from datetime import datetime
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.commands import CommandClient
from libs.contracts import Command
from libs.contracts.audit import AuditRecords, QueryAudit
from libs.contracts.payments import (
    CheckoutCompletion,
    CheckoutRefund,
    CheckoutView,
    CompleteCheckout,
    CreateCheckout,
    CreateEvent,
    EventView,
    GetCheckout,
    GetLedgerBalances,
    LedgerBalances,
    RefundCheckout,
)
from libs.contracts.scanning import (
    GetOccupancy,
    OfflineScansSynced,
    Occupancy,
    ScanDecision,
    ScanTicket,
    SyncOfflineScans,
)
from libs.db import CONNECTION_ERRORS
from libs.envelope import new_id
from libs.errors import (
    HTTP_STATUS,
    DomainError,
    ErrorCode,
    InvalidInput,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
    Conflict,
)
from libs.log import bound_correlation, get_logger
from libs.policy import Action, Resource, authorize
from libs.subjects import command
from services.gateway.adapters.nats_feeds import RESYNC, OccupancyFeed
from services.gateway.adapters.postgres import ApiKeyRecord, DeviceRecord, GatewayStore
from services.gateway.adapters.redis_limits import RateLimiter
from services.gateway.domain.idempotency import (
    IDEMPOTENCY_HEADER,
    InProgress,
    Mismatch,
    Replay,
    check_key,
    keeps_response,
    request_fingerprint,
)
from services.gateway.handlers import Authenticator, CredentialAdmin, Principal
from services.gateway.schemas import (
    ApiKeyIssued,
    ApiKeyList,
    ApiKeyView,
    CompleteCheckoutBody,
    CreateApiKey,
    CreateCheckoutBody,
    CreateEventBody,
    DeviceEnrolment,
    DeviceList,
    DeviceRegistration,
    DeviceView,
    EnrolDevice,
    Problem,
    RegisterDevice,
    ScanBatchBody,
    ScanBody,
)

__all__ = ["Gateway", "install_routes", "CORRELATION_HEADER"]

log = get_logger(__name__)

CORRELATION_HEADER = "X-Correlation-Id"
TENANT_HEADER = "Vge-Organization-Id"
_CORRELATION = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROBLEM_JSON = "application/problem+json"

HTTP_REQUESTS = Counter("vge_http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_SECONDS = Histogram(
    "vge_http_request_seconds", "HTTP request time (to the first byte of the response)", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


@dataclass
class Gateway:
    """What the routes need, wired by ``bootstrap``."""

    store: GatewayStore
    auth: Authenticator
    credentials: CredentialAdmin
    commands: CommandClient
    limits: RateLimiter
    feed: OccupancyFeed
    public_url: str
    sync_timeout: float = 30.0
    heartbeat_seconds: float = 15.0


# -- the edge: correlation id, body size, metrics -------------------------------------------


class Edge:
    """Pure ASGI middleware (no per-request task, streaming intact): gives every request a
    correlation id (the client's ``X-Correlation-Id`` if well-formed), refuses bodies over the
    limit, and counts requests per route."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = _header(scope, b"x-correlation-id")
        correlation_id = given if given and _CORRELATION.match(given) else str(new_id())
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        status = {"code": 500}
        length = _header(scope, b"content-length")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-correlation-id", correlation_id.encode())]  # fmt: skip
                route = scope.get("route")
                name = getattr(route, "path", "unmatched")
                HTTP_SECONDS.labels(name).observe(time.perf_counter() - started)
                HTTP_REQUESTS.labels(name, scope["method"], str(message["status"])).inc()
            await send(message)

        async def too_large() -> None:
            body = _problem(PayloadTooLarge(f"request body over {self.max_body} bytes"),
                            correlation_id)  # fmt: skip
            await JSONResponse(body, 413, media_type=PROBLEM_JSON)(scope, receive, send_with_id)

        with bound_correlation(correlation_id):
            if length is not None:
                if not length.isdigit() or int(length) > self.max_body:
                    await too_large()
                    return
                await self.app(scope, receive, send_with_id)  # the server holds it to the length
                return
            # no Content-Length (chunked): take the body in up to the limit before the app sees it
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body:
                    await too_large()
                    return
            buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return buffered
                return await receive()  # then the disconnect, when it comes

            await self.app(scope, replay, send_with_id)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


# -- problems ---------------------------------------------------------------------------------

_TITLES = {
    ErrorCode.INVALID_INPUT: "Invalid input",
    ErrorCode.UNAUTHENTICATED: "Unauthenticated",
    ErrorCode.FORBIDDEN: "Forbidden",
    ErrorCode.NOT_FOUND: "Not found",
    ErrorCode.CONFLICT: "Conflict",
    ErrorCode.RATE_LIMITED: "Too many requests",
    ErrorCode.PAYLOAD_TOO_LARGE: "Payload too large",
    ErrorCode.UNAVAILABLE: "Service unavailable",
    ErrorCode.INTERNAL: "Internal error",
}


def _problem(exc: DomainError, correlation_id: str | None, status: int | None = None) -> dict[str, Any]:
    status = status or HTTP_STATUS.get(exc.code, 500)
    body: dict[str, Any] = {
        "type": "about:blank", "title": _TITLES.get(exc.code, "Error"), "status": status,
        "detail": exc.detail, "code": exc.code.value, "correlation_id": correlation_id,
    }  # fmt: skip
    for key, value in exc.extra.items():  # e.g. reason=sold_out, ticket_type, errors
        body.setdefault(key, value)
    return body


def _problem_response(body: dict[str, Any]) -> JSONResponse:
    headers = {}
    if body["status"] in (429, 503):
        headers["Retry-After"] = str(body.get("retry_after", 1))
    elif body["status"] == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="voelgoed"'

    return JSONResponse(body, body["status"], media_type=PROBLEM_JSON, headers=headers)


def _correlation(request: Request) -> str:
    return request.state.correlation_id


@dataclass(frozen=True)
class ReplyJSON:
    """A service's reply as the JSON it wrote, answered as it is."""

    body: bytes


def _ok(result: Any, status_code: int) -> Response:
    if isinstance(result, ReplyJSON):
        return Response(result.body, status_code, media_type="application/json")
    return JSONResponse(result, status_code)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure becomes problem+json; nothing escapes as a bare 500 page."""

    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> JSONResponse:
        body = _problem(exc, _correlation(request))
        level = log.warning if body["status"] >= 500 else log.info
        level("request_refused", code=exc.code.value, detail=exc.detail, path=request.url.path)
        return _problem_response(body)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        malformed = any(e.get("type") == "json_invalid" for e in errors)
        err = InvalidInput("request body is not valid JSON" if malformed
                           else "request does not match the schema", errors=errors)  # fmt: skip
        log.info("request_invalid", path=request.url.path, errors=len(errors))
        return _problem_response(_problem(err, _correlation(request), 400 if malformed else 422))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 401: ErrorCode.UNAUTHENTICATED,
                403: ErrorCode.FORBIDDEN}.get(exc.status_code, ErrorCode.INVALID_INPUT)  # fmt: skip
        err = DomainError(str(exc.detail))
        err.code = code
        return _problem_response(_problem(err, _correlation(request), exc.status_code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, CONNECTION_ERRORS):
            log.warning("dependency_down", error=repr(exc), path=request.url.path)
            return _problem_response(_problem(Unavailable("a dependency is not answering"),
                                              _correlation(request)))  # fmt: skip
        log.exception("request_failed", error=repr(exc), path=request.url.path)
        err = DomainError("internal error")
        return _problem_response(_problem(err, _correlation(request), 500))


async def _body_in_slices(model: type[Command], request: Request) -> Any:
    """The request's JSON body as ``model``, read a slice at a time (``Command.parse_in_slices``),
    and refused as FastAPI refuses a body it reads: the same errors, the same statuses."""
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                       "input": None}])  # fmt: skip
    content_type = email.message.Message()
    content_type["content-type"] = request.headers.get("content-type", "")
    subtype = content_type.get_content_subtype()
    try:
        if content_type.get_content_maintype() != "application" or not (
            subtype == "json" or subtype.endswith("+json")
        ):
            return model.model_validate(raw)  # not JSON: FastAPI validates the bytes (and refuses)
        return await model.parse_in_slices(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            try:
                json.loads(raw)
            except json.JSONDecodeError as bad:  # (FastAPI's words and position)
                raise RequestValidationError([{"type": "json_invalid", "loc": ("body", bad.pos),
                                               "msg": "JSON decode error", "input": {},
                                               "ctx": {"error": bad.msg}}]) from None  # fmt: skip
            except ValueError:  # (not UTF-8: FastAPI answers that with a 400 of its own)
                raise StarletteHTTPException(400, "There was an error parsing the body") from None
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _document_body(app: FastAPI, path: str, model: type[BaseModel]) -> None:
    """Document ``model`` as the JSON body of ``POST path``, a route that reads its body itself:
    as FastAPI documents a body it reads (its own schema generation, on a route made for it)."""

    async def body_of(body: Any) -> None:
        """(documentation only)"""

    body_of.__annotations__ = {"body": model, "return": None}  # (annotations are text in this module)
    documented = APIRouter()
    documented.add_api_route(path, body_of, methods=["POST"])
    names = {model.__name__, *model.model_json_schema().get("$defs", {})}
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            extra = get_openapi(title=app.title, version=app.version, routes=documented.routes)
            spec["paths"][path]["post"]["requestBody"] = extra["paths"][path]["post"]["requestBody"]
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name in names:
                schemas.setdefault(name, extra["components"]["schemas"][name])
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


# -- routes -----------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="API key, device token or user JWT")
_ERRORS = {s: {"model": Problem, "content": {PROBLEM_JSON: {}}} for s in (400, 401, 403, 404,
                                                                          409, 422, 429, 503)}  # fmt: skip


def install_routes(app: FastAPI, gw: Gateway) -> None:
    """The routes of design §7 on ``app``."""

    async def principal(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ) -> Principal:
        # ``credentials`` only documents the scheme in OpenAPI; the header is parsed here
        p = await gw.auth.authenticate(request.headers.get("authorization"))
        await gw.limits.check(p.credential_id)
        platform = p.actor.is_platform_admin or p.actor.is_platform_staff
        if platform and request.method in ("GET", "HEAD"):
            await audit_platform_read(request, p)
        return p

    async def audit_platform_read(request: Request, p: Principal) -> None:
        # Design §4: a read across tenants is itself audited. The event commits before the
        # read is served (no record, no read), in the tenant's own audit log.
        org = tenant(request, p)
        if org == p.actor.organization_id:
            return  # a platform actor's own organization: an ordinary read
        await gw.store.record_platform_read(org, p.actor, request.method, request.url.path,
                                            request.url.query, _correlation(request))  # fmt: skip

    def tenant(request: Request, p: Principal) -> UUID:
        return p.tenant(request.headers.get(TENANT_HEADER))

    async def ask(request: Request, p: Principal, service: str, name: str, body: BaseModel,
                  timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        return await gw.commands.request(
            command(service, name), body, actor=p.actor, org_id=tenant(request, p),
            correlation_id=_correlation(request), timeout=timeout,
        )

    async def ask_json(request: Request, p: Principal, service: str, name: str, body: BaseModel,
                       timeout: float | None = None) -> ReplyJSON:  # fmt: skip
        """``ask``, the reply passed on as the service wrote it, not read and written again."""
        return ReplyJSON(await gw.commands.request_json(
            command(service, name), body, actor=p.actor, org_id=tenant(request, p),
            correlation_id=_correlation(request), timeout=timeout,
        ))

    async def idempotent(request: Request, p: Principal, status_code: int,
                         work: Callable[[str | None], Awaitable[Any]]) -> Response:  # fmt: skip
        """Run ``work`` once per (credential, Idempotency-Key); a repeat replays the response."""
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return _ok(await work(None), status_code)
        check_key(key)
        org = tenant(request, p)
        fingerprint = request_fingerprint(request.method, request.url.path, await request.body())
        outcome = await gw.store.claim_idempotency_key(org, p.credential_id, key, fingerprint)
        if isinstance(outcome, Replay):
            media = PROBLEM_JSON if outcome.status_code >= 400 else "application/json"
            return JSONResponse(outcome.body, outcome.status_code, media_type=media,
                                headers={"Idempotent-Replayed": "true"})  # fmt: skip
        if isinstance(outcome, Mismatch):
            raise InvalidInput("this Idempotency-Key was used for a different request",
                               reason="idempotency_key_reused")  # fmt: skip
        if isinstance(outcome, InProgress):
            raise Conflict("a request with this Idempotency-Key is still in progress",
                           reason="idempotency_in_progress")  # fmt: skip
        try:
            result = await work(key)
        except DomainError as exc:
            body = _problem(exc, _correlation(request))
            if keeps_response(body["status"]):
                await gw.store.complete_idempotency_key(org, p.credential_id, key, body["status"], body)
            else:
                await gw.store.release_idempotency_key(org, p.credential_id, key)
            raise
        except BaseException:
            await gw.store.release_idempotency_key(org, p.credential_id, key)
            raise
        stored = orjson.loads(result.body) if isinstance(result, ReplyJSON) else result
        await gw.store.complete_idempotency_key(org, p.credential_id, key, status_code, stored)
        return _ok(result, status_code)

    # -- events and checkouts (payments) ------------------------------------------------------

    @app.post("/v1/events", status_code=201, response_model=EventView, responses=_ERRORS,
              tags=["catalog"])  # fmt: skip
    async def create_event(request: Request, body: CreateEventBody,  # type: ignore[valid-type]
                           p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Create an event with its ticket types (owner/admin)."""
        authorize(p.actor, Action.EVENT_CREATE, Resource("event", tenant(request, p)))

        async def work(key: str | None) -> Any:
            cmd = CreateEvent(**body.model_dump(), idempotency_key=key)
            return await ask(request, p, "payments", "create_event", cmd)

        return await idempotent(request, p, 201, work)

    @app.post("/v1/checkouts", status_code=201, response_model=CheckoutView, responses=_ERRORS,
              tags=["checkout"])  # fmt: skip
    async def create_checkout(request: Request, body: CreateCheckoutBody,  # type: ignore[valid-type]
                              p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Hold tickets for a buyer; sold out is 409 with ``reason: sold_out``."""
        authorize(p.actor, Action.CHECKOUT_CREATE, Resource("checkout", tenant(request, p)))

        async def work(key: str | None) -> Any:
            cmd = CreateCheckout(**body.model_dump(), idempotency_key=key)
            return await ask(request, p, "payments", "create_checkout", cmd)

        return await idempotent(request, p, 201, work)

    @app.get("/v1/checkouts/{checkout_id}", response_model=CheckoutView, responses=_ERRORS,
             tags=["checkout"])  # fmt: skip
    async def get_checkout(request: Request, checkout_id: UUID,
                           p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """A checkout of the caller's tenant."""
        authorize(p.actor, Action.CHECKOUT_READ, Resource("checkout", tenant(request, p)))
        return JSONResponse(await ask(request, p, "payments", "get_checkout",
                                      GetCheckout(checkout_id=checkout_id)))  # fmt: skip

    @app.post("/v1/checkouts/{checkout_id}/complete", response_model=CheckoutCompletion,
              responses=_ERRORS, tags=["checkout"])  # fmt: skip
    async def complete_checkout(
        request: Request, checkout_id: UUID, body: CompleteCheckoutBody,  # type: ignore[valid-type]
        p: Principal = Depends(principal),
        idempotency_key: str = Header(alias=IDEMPOTENCY_HEADER, min_length=1, max_length=200,
                                      description="Completing again with it returns the first result."),
    ) -> Response:  # fmt: skip
        """Pay and issue the tickets; the same Idempotency-Key never charges twice."""
        authorize(p.actor, Action.CHECKOUT_COMPLETE, Resource("checkout", tenant(request, p)))

        async def work(key: str | None) -> Any:
            cmd = CompleteCheckout(checkout_id=checkout_id, idempotency_key=key or idempotency_key,
                                   **body.model_dump())  # fmt: skip
            return await ask(request, p, "payments", "complete_checkout", cmd, timeout=15.0)

        return await idempotent(request, p, 200, work)

    @app.post("/v1/checkouts/{checkout_id}/refund", response_model=CheckoutRefund,
              responses=_ERRORS, tags=["checkout"])  # fmt: skip
    async def refund_checkout(request: Request, checkout_id: UUID,
                              p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Refund a completed checkout in whole (owner/admin); its tickets are cancelled."""
        authorize(p.actor, Action.CHECKOUT_REFUND, Resource("checkout", tenant(request, p)))

        async def work(key: str | None) -> Any:
            return await ask(request, p, "payments", "refund_checkout",
                             RefundCheckout(checkout_id=checkout_id), timeout=15.0)  # fmt: skip

        return await idempotent(request, p, 200, work)

    @app.get("/v1/ledger/balances", response_model=LedgerBalances, responses=_ERRORS,
             tags=["ledger"])  # fmt: skip
    async def ledger_balances(request: Request, p: Principal = Depends(principal)) -> Response:
        """The balance of every account of the tenant."""
        authorize(p.actor, Action.LEDGER_READ, Resource("ledger", tenant(request, p)))
        return JSONResponse(await ask(request, p, "payments", "ledger_balances", GetLedgerBalances()))

    # -- scans and occupancy (scanning) -------------------------------------------------------

    @app.post("/v1/scans", response_model=ScanDecision, responses=_ERRORS, tags=["scanning"])
    async def scan(request: Request, body: ScanBody,  # type: ignore[valid-type]
                   p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Decide one scan at a gate; a retry with the same nonce returns the first decision."""
        authorize(p.actor, Action.SCAN_SUBMIT, Resource("scan", tenant(request, p)))
        fields = body.model_dump()
        device = p.device
        if device is not None:
            fields["gate"] = fields["gate"] or device.gate
            fields["device_event_id"] = device.event_id
        # the body was validated once already; what the gateway adds comes from its own record
        cmd = ScanTicket.model_construct(**fields)

        async def work(key: str | None) -> Any:
            return await ask(request, p, "scanning", "scan", cmd)

        return await idempotent(request, p, 200, work)

    @app.post("/v1/scans/batch", response_model=OfflineScansSynced, responses=_ERRORS,
              tags=["scanning"])  # fmt: skip
    async def scan_batch(request: Request, p: Principal = Depends(principal)) -> Response:
        """Upload scans decided offline (up to 10,000); one result per scan, in order."""
        authorize(p.actor, Action.SCAN_SYNC, Resource("scan", tenant(request, p)))
        # read here, a slice at a time, not by FastAPI in one go: 10,000 scans held this
        # loop ~80 ms, and every gate's scan meanwhile (its body is documented below)
        body = await _body_in_slices(ScanBatchBody, request)
        # up to 10,000 scans, validated once as the body: not again as the command
        cmd = SyncOfflineScans.model_construct(scans=list(body.scans), device_event_id=None)
        device = p.device
        if device is not None:
            for s in cmd.scans:
                if s.gate is None:
                    s.gate = device.gate
            cmd.device_event_id = device.event_id
        async def work(key: str | None) -> Any:
            # (10,000 results, ~2 MB: read and written again, they held this loop ~50 ms)
            return await ask_json(request, p, "scanning", "sync", cmd, timeout=gw.sync_timeout)

        return await idempotent(request, p, 200, work)

    _document_body(app, "/v1/scans/batch", ScanBatchBody)

    @app.get("/v1/events/{event_id}/occupancy", response_model=Occupancy, responses=_ERRORS,
             tags=["scanning"])  # fmt: skip
    async def occupancy(request: Request, event_id: UUID,
                        p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Tickets inside now, with entries, exits and capacity."""
        authorize(p.actor, Action.OCCUPANCY_READ, Resource("occupancy", tenant(request, p)))
        return JSONResponse(await ask(request, p, "scanning", "occupancy",
                                      GetOccupancy(event_id=event_id)))  # fmt: skip

    @app.get("/v1/events/{event_id}/occupancy/stream", responses=_ERRORS, tags=["scanning"],
             response_class=EventSourceResponse)  # fmt: skip
    async def occupancy_stream(request: Request, event_id: UUID,
                               p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Server-sent events: the current occupancy first, then every change (``occupancy``)."""
        org = tenant(request, p)
        authorize(p.actor, Action.OCCUPANCY_READ, Resource("occupancy", org))
        # watch before reading the current value, so no change between the two is lost
        queue = await gw.feed.watch(org, event_id)
        try:
            current = await ask(request, p, "scanning", "occupancy", GetOccupancy(event_id=event_id))
        except BaseException:
            await gw.feed.unwatch(org, event_id, queue)
            raise

        authorization = request.headers.get("authorization")

        async def events():  # noqa: ANN202 - an async generator of SSE events
            try:
                yield {"event": "occupancy", "data": json.dumps(_occupancy_view(current))}
                last = _instant(current.get("updated_at"))
                behind = False  # a re-read after a reconnect failed: again at the next heartbeat
                while True:
                    try:
                        change = await asyncio.wait_for(queue.get(), gw.heartbeat_seconds)
                    except TimeoutError:
                        # a stream outlives requests: a revoked credential ends it too
                        try:
                            await gw.auth.authenticate(authorization)
                        except Unauthenticated as exc:
                            yield {"event": "error",
                                   "data": json.dumps(_problem(exc, _correlation(request)))}  # fmt: skip
                            return
                        if not behind:
                            continue
                        change = RESYNC
                    if change is RESYNC:
                        # this gateway's NATS connection was away and missed the changes
                        # published meanwhile: read the current value again
                        try:
                            change = await ask(request, p, "scanning", "occupancy",
                                               GetOccupancy(event_id=event_id))  # fmt: skip
                        except DomainError:
                            behind = True
                            continue
                        behind = False
                    at = _instant(change.get("updated_at"))
                    if last is not None and at is not None and at <= last:
                        continue  # already part of what this client has
                    last = at
                    yield {"event": "occupancy", "id": str(change.get("version", "")),
                           "data": json.dumps(_occupancy_view(change))}  # fmt: skip
            finally:
                await gw.feed.unwatch(org, event_id, queue)

        return EventSourceResponse(events(), ping=gw.heartbeat_seconds,
                                   headers={"Cache-Control": "no-store"})  # fmt: skip

    # -- audit ------------------------------------------------------------------------------

    @app.get("/v1/audit", response_model=AuditRecords, responses=_ERRORS, tags=["audit"])
    async def audit(
        request: Request, p: Principal = Depends(principal),
        resource_id: str | None = None, correlation_id: str | None = None,
        action: str | None = None, resource_type: str | None = None,
        since: str | None = None, until: str | None = None, cursor: str | None = None,
        limit: int = 100,
    ) -> Response:  # fmt: skip
        """The tenant's audit records, oldest first (owner/admin); ``next`` pages on."""
        authorize(p.actor, Action.AUDIT_READ, Resource("audit", tenant(request, p)))
        params = {"resource_id": resource_id, "correlation_id": correlation_id, "action": action,
                  "resource_type": resource_type, "since": since, "until": until,
                  "cursor": cursor, "limit": limit}  # fmt: skip
        try:
            query = QueryAudit.model_validate(params)
        except ValueError as exc:
            raise InvalidInput("bad audit query", errors=_errors_of(exc)) from exc
        return JSONResponse(await ask(request, p, "audit", "query", query, timeout=10.0))

    # -- credentials (the gateway's own) ----------------------------------------------------

    @app.post("/v1/devices", status_code=201, response_model=DeviceRegistration,
              responses=_ERRORS, tags=["credentials"])  # fmt: skip
    async def register_device(request: Request, body: RegisterDevice,
                              p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Register a gate device; the single-use enrolment token is shown once (owner/admin)."""

        async def work(key: str | None) -> Any:
            device, token, expires_at = await gw.credentials.register_device(
                p, tenant(request, p), body.name, body.event_id, body.gate, _correlation(request))
            qr = "voelgoed-enrol:" + json.dumps({"api": gw.public_url, "enrolment_token": token},
                                                separators=(",", ":"))  # fmt: skip
            return DeviceRegistration(**_device_view(device).model_dump(), enrolment_token=token,
                                      enrolment_expires_at=expires_at, enrolment_qr=qr
                                      ).model_dump(mode="json")  # fmt: skip

        return await idempotent(request, p, 201, work)

    @app.post("/v1/devices/enrol", response_model=DeviceEnrolment, responses=_ERRORS,
              tags=["credentials"])  # fmt: skip
    async def enrol_device(request: Request, body: EnrolDevice) -> Response:
        """Exchange an enrolment token, once, for the device token (no bearer needed)."""
        # no credential yet: limit by the caller's address instead
        await gw.limits.check(f"enrol:{request.client.host if request.client else 'unknown'}")
        device, token = await gw.credentials.enrol(body.enrolment_token, _correlation(request))
        return JSONResponse(_enrolment_view(device, token))

    @app.get("/v1/devices", response_model=DeviceList, responses=_ERRORS, tags=["credentials"])
    async def list_devices(request: Request, p: Principal = Depends(principal)) -> Response:
        """The tenant's devices (owner/admin)."""
        devices = await gw.credentials.list_devices(p, tenant(request, p))
        return JSONResponse(DeviceList(devices=[_device_view(d) for d in devices]).model_dump(mode="json"))

    @app.post("/v1/devices/{device_id}/revoke", response_model=DeviceView, responses=_ERRORS,
              tags=["credentials"])  # fmt: skip
    async def revoke_device(request: Request, device_id: UUID,
                            p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Revoke a device: its token is refused at once (owner/admin)."""
        async def work(key: str | None) -> Any:
            device = await gw.credentials.revoke_device(p, tenant(request, p), device_id,
                                                        _correlation(request))  # fmt: skip
            return _device_view(device).model_dump(mode="json")

        return await idempotent(request, p, 200, work)

    @app.post("/v1/devices/{device_id}/token", response_model=DeviceEnrolment, responses=_ERRORS,
              tags=["credentials"])  # fmt: skip
    async def roll_device_token(request: Request, device_id: UUID,
                                p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Roll a device's token (the device itself, or owner/admin); the old one stops working."""
        async def work(key: str | None) -> Any:
            device, token = await gw.credentials.roll_device_token(p, tenant(request, p), device_id,
                                                                   _correlation(request))  # fmt: skip
            return _enrolment_view(device, token)

        return await idempotent(request, p, 200, work)

    @app.post("/v1/api-keys", status_code=201, response_model=ApiKeyIssued, responses=_ERRORS,
              tags=["credentials"])  # fmt: skip
    async def create_api_key(request: Request, body: CreateApiKey,
                             p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Mint an API key, shown once (owner/admin; never more powerful than its minter)."""

        async def work(key: str | None) -> Any:
            record, secret = await gw.credentials.create_api_key(
                p, tenant(request, p), body.name, body.role, _correlation(request))
            return ApiKeyIssued(**_api_key_view(record).model_dump(), api_key=secret
                                ).model_dump(mode="json")  # fmt: skip

        return await idempotent(request, p, 201, work)

    @app.get("/v1/api-keys", response_model=ApiKeyList, responses=_ERRORS, tags=["credentials"])
    async def list_api_keys(request: Request, p: Principal = Depends(principal)) -> Response:
        """The tenant's API keys, never their secrets (owner/admin)."""
        keys = await gw.credentials.list_api_keys(p, tenant(request, p))
        return JSONResponse(ApiKeyList(api_keys=[_api_key_view(k) for k in keys]).model_dump(mode="json"))

    @app.post("/v1/api-keys/{api_key_id}/revoke", response_model=ApiKeyView, responses=_ERRORS,
              tags=["credentials"])  # fmt: skip
    async def revoke_api_key(request: Request, api_key_id: UUID,
                             p: Principal = Depends(principal)) -> Response:  # fmt: skip
        """Revoke an API key: it is refused at once (owner/admin)."""
        async def work(key: str | None) -> Any:
            record = await gw.credentials.revoke_api_key(p, tenant(request, p), api_key_id,
                                                         _correlation(request))  # fmt: skip
            return _api_key_view(record).model_dump(mode="json")

        return await idempotent(request, p, 200, work)


def _instant(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _occupancy_view(value: dict[str, Any]) -> dict[str, Any]:
    keys = ("event_id", "inside", "entries", "exits", "capacity", "updated_at", "by_gate",
            "by_ticket_type")  # fmt: skip
    return {k: value[k] for k in keys if k in value}


def _device_view(d: DeviceRecord) -> DeviceView:
    return DeviceView(device_id=d.device_id, name=d.name, event_id=d.event_id, gate=d.gate,
                      enrolled_at=d.enrolled_at, revoked_at=d.revoked_at, created_at=d.created_at)  # fmt: skip


def _enrolment_view(d: DeviceRecord, device_token: str) -> dict[str, Any]:
    return DeviceEnrolment(device_id=d.device_id, device_token=device_token, event_id=d.event_id,
                           gate=d.gate).model_dump(mode="json")  # fmt: skip


def _api_key_view(k: ApiKeyRecord) -> ApiKeyView:
    return ApiKeyView(api_key_id=k.api_key_id, name=k.name, role=k.role, created_at=k.created_at,
                      revoked_at=k.revoked_at)  # fmt: skip


def _errors_of(exc: Exception) -> list[dict[str, Any]]:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in errors()]
    return [{"msg": str(exc)}]
