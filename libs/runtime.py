"""What every service process does the same way: connect, migrate, serve health and metrics,
run its commands, consumers and outbox relay, and stop cleanly on SIGTERM.

A service's ``bootstrap`` builds a ``ServiceRuntime``, registers its commands on
``runtime.router`` and consumers with ``runtime.add_consumer``, and calls ``run_until_stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import asyncpg
import nats
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest

from libs.context import ContextVerifier, load_public_keys
from libs.db import CONNECTION_ERRORS, create_pool, service_dsn
from libs.jetstream import EventConsumer, EventHandler, ensure_streams
from libs.log import configure_logging, get_logger
from libs.migrations import migrate
from libs.nats_auth import connect_options
from libs.outbox import OutboxRelay
from libs.redis_store import RedisStore
from libs.servers import bind_port
from libs.settings import Settings, nats_servers
from libs.commands import CommandRouter, flush_in_order

__all__ = ["ServiceRuntime", "MissingConfiguration", "run_service", "watch_gc_pauses", "watch_loop_lag"]

log = get_logger(__name__)

GC_PAUSES = Histogram(
    "vge_gc_pause_seconds", "Garbage collections of this process (the event loop stands still)",
    ["generation"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
_gc_started: list[float] = []


def _time_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started.append(time.perf_counter())
    elif _gc_started:
        GC_PAUSES.labels(str(info["generation"])).observe(time.perf_counter() - _gc_started.pop())


def watch_gc_pauses() -> None:
    """Time every garbage collection of this process into ``vge_gc_pause_seconds`` (once per
    process: a second call changes nothing)."""
    if _time_gc not in gc.callbacks:
        gc.callbacks.append(_time_gc)


LOOP_LAG = Histogram(
    "vge_event_loop_lag_seconds",
    "How late this process's event loop ran a timer: a command or event waiting in the loop "
    "at that moment waited as long (a stall, whatever its cause)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
# A stall at least this long is always seen (the timer falls inside it); a shorter one with a
# probability of its length over this. Measured: 0.5% of a core in an idle process (50 wake-ups
# a second), less in a busy one, whose loop is awake anyway.
LOOP_LAG_INTERVAL = 0.02
_loop_lag_watch: asyncio.Task[None] | None = None


async def _watch_loop_lag(interval: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        LOOP_LAG.observe(max(0.0, loop.time() - due))


def watch_loop_lag(interval: float = LOOP_LAG_INTERVAL) -> asyncio.Task[None]:
    """Measure the running event loop's stalls into ``vge_event_loop_lag_seconds`` (one watch
    per loop: a second call returns the first). A command waits through every stall of the loop
    it is in: a GC pause (``vge_gc_pause_seconds`` tells that one apart), a burst of work of one
    task, the process waiting for a CPU."""
    global _loop_lag_watch
    loop = asyncio.get_running_loop()
    if _loop_lag_watch is None or _loop_lag_watch.done() or _loop_lag_watch.get_loop() is not loop:
        _loop_lag_watch = loop.create_task(_watch_loop_lag(interval), name="loop-lag-watch")
    return _loop_lag_watch


class MissingConfiguration(RuntimeError):
    """A service was started without the server URLs or keys it needs."""


class ServiceRuntime:
    """The connections and background work of one service process."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        *,
        migrations_dir: Path | None,
        http_app: FastAPI | None = None,
        http_port: int | None = None,
        uses_redis: bool = True,
    ) -> None:
        self.name = name
        self.settings = settings
        self.migrations_dir = migrations_dir
        self.uses_redis = uses_redis
        self.log = get_logger(f"services.{name}")
        missing = [
            var
            for var, value in (
                ("VGE_NATS_URL", settings.nats_url),
                ("VGE_DATABASE_URL", settings.database_url),
                ("VGE_REDIS_URL", settings.redis_url if uses_redis else "-"),
                ("VGE_CONTEXT_PUBLIC_KEYS", settings.context_public_keys),
            )
            if not value
        ]
        if missing:
            raise MissingConfiguration(
                f"{name} needs {', '.join(missing)} (or run everything with `vge up`)"
            )
        self.verifier = ContextVerifier(load_public_keys(settings.context_public_keys or ""))
        self.router = CommandRouter(name, self.verifier)
        self.http = http_app or FastAPI(title=f"vge-{name}", docs_url=None, redoc_url=None)
        self.http_port = http_port if http_port is not None else settings.health_port
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        # the outbox relay's own connection (see start)
        self.outbox_nc: NATS | None = None
        self._stopping = False
        # healthy means serving: from the end of start to the beginning of stop (a process
        # answers /healthz from the middle of start on, and a SIGTERM there abandons the start)
        self._serving = False
        self.pool: asyncpg.Pool | None = None
        self.redis: RedisStore | None = None
        self.relay: OutboxRelay | None = None
        # the service's wired components by name (handlers, stores), for introspection and tests
        self.components: dict[str, Any] = {}
        self._consumer_specs: list[dict[str, Any]] = []
        self._publishes: list[type[Any]] = []
        self._consumers: list[EventConsumer] = []
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._http_server: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._started_at = time.time()
        self._install_health_routes()

    # -- wiring ---------------------------------------------------------------------------

    def add_consumer(self, durable: str, handler: EventHandler, **options: Any) -> None:
        """Consume ``VGE_EVENTS`` with a durable consumer once the runtime has started."""
        self._consumer_specs.append({"durable": durable, "handler": handler, **options})

    def publishes(self, *events: type[Any]) -> None:
        """Declare the event models this service publishes (for its AsyncAPI description)."""
        self._publishes.extend(events)

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` after the connections are up and before commands are served."""
        self._on_start.append(fn)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` during shutdown, before the connections close."""
        self._on_stop.append(fn)

    def on_reconnect(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` each time the commands' connection (``nc``) is back after a disconnect.
        Core NATS messages published meanwhile never reach it (JetStream consumers catch up by
        themselves): whatever follows live messages (a dashboard's feed, a cache kept fresh by
        broadcasts) must catch up here. ``fn`` should be quick: it runs inside nats-py's
        reconnect."""
        self._on_reconnect.append(fn)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate, connect, start background work, then serve commands and health."""
        s = self.settings
        assert s.database_url and s.nats_url
        applied = await migrate(
            s.database_url, self.name, self.migrations_dir, role_password=s.db_role_password
        )
        dsn = s.service_database_url or service_dsn(s.database_url, self.name, s.db_role_password)
        self.pool = await create_pool(dsn, schema=self.name, min_size=2, max_size=20)
        self.nc = await self._connect_nats(f"vge-{self.name}", catch_up=self._on_reconnect)
        self.js = self.nc.jetstream()
        await ensure_streams(self.js, duplicate_window=s.events_duplicate_window_seconds,
                             replicas=s.stream_replicas)
        if self.uses_redis and s.redis_url:
            self.redis = RedisStore(s.redis_url, timeout=s.redis_timeout_seconds)
        # The relay publishes on a connection of its own. On the commands' connection each pass
        # (~50 JetStream publishes every 50 ms at 1,000 scans/s, then their acks) went into the
        # same TCP stream as the replies: a reply written just after a pass waited behind it,
        # in the socket and in nats-server's reading of that one connection (a goroutine per
        # connection). bench/bench_scan.py at 1,000/s, 5 pairs: p99 0.25-1.6 ms lower.
        self.outbox_nc = await self._connect_nats(f"vge-{self.name}-outbox")
        self.relay = OutboxRelay(self.pool, self.outbox_nc, self.name,
                                 batch_size=s.outbox_batch_size, poll_interval=s.outbox_poll_seconds)
        self.relay.start()
        for fn in self._on_start:
            await fn()
        for spec in self._consumer_specs:
            spec.setdefault("max_deliver", s.consumer_max_deliver)
            spec.setdefault("backoff", s.consumer_backoff)
            consumer = EventConsumer(self.js, **spec)
            await consumer.start()
            self._consumers.append(consumer)
        await self.router.start(self.nc)
        # started means reachable: the server has every subscription before the log says so
        await flush_in_order(self.nc)
        await self._start_http()
        self.log.info(
            "service_started",
            migrations_applied=applied,
            commands=[r.subject for r in self.router.routes],
            consumers=[c.durable for c in self._consumers],
            http_port=self.http_port,
        )
        self._serving = True

    async def stop(self) -> None:
        """Stop in reverse order: no new commands, drain consumers, flush outbox, close."""
        self._stopping = True
        self._serving = False
        self.log.info("service_stopping")
        await self.router.stop()
        for consumer in self._consumers:
            await consumer.stop()
        for fn in reversed(self._on_stop):
            try:
                await fn()
            except Exception as exc:  # noqa: BLE001 - keep shutting down
                self.log.warning("stop_hook_failed", error=repr(exc))
        if self.relay:
            await self.relay.stop()
        if self._http_server:
            self._http_server.should_exit = True
            if self._http_task:
                await asyncio.wait([self._http_task], timeout=5.0)
        for nc in (self.nc, self.outbox_nc):
            if nc and not nc.is_closed:
                try:
                    await asyncio.wait_for(nc.drain(), 5.0)
                except Exception:  # noqa: BLE001
                    try:
                        await nc.close()
                    except Exception as exc:  # noqa: BLE001 - NATS already gone: nothing to flush
                        self.log.warning("nats_close_failed", error=repr(exc))
        if self.redis:
            await self.redis.close()
        if self.pool:
            try:
                await asyncio.wait_for(self.pool.close(), 10.0)
            except (TimeoutError, *CONNECTION_ERRORS) as exc:
                # a connection still busy (PostgreSQL gone mid-query): stopping must not hang
                self.log.warning("pool_close_forced", error=repr(exc))
                self.pool.terminate()
        self.log.info("service_stopped")

    async def run_until_stopped(self) -> None:
        """Start, wait for SIGTERM or SIGINT, stop. A signal during start-up (a server that
        does not answer yet) abandons it; stopping takes at most ``stop_timeout_seconds``, so
        a server gone mid-shutdown never leaves the process hanging."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self.start(), name=f"{self.name}-start")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # half started: the process exits and the OS closes what was opened
            self.log.warning("stopped_while_starting")
            starting.cancel()
            await asyncio.wait([starting])
            return
        if starting.exception() is not None:
            stopping.cancel()
            # stop what the start opened (connections, relay, consumers) before raising: left to
            # asyncio.run's clean-up, a task that swallows its cancellation (nats-py's) keeps the
            # process from ever exiting, and an orchestrator never restarts it
            self.log.error("start_failed", error=repr(starting.exception()))
            await self._stop_within_deadline()
            starting.result()  # start-up failed: raise it
        self._tune_gc()
        watch_loop_lag()  # process-wide, like the GC tuning: here, not in start
        await stopping
        await self._stop_within_deadline()

    def _tune_gc(self) -> None:
        """What start-up built (modules, models, pools) lives as long as the process: keep it
        out of every collection. Collect young objects every 5,000 allocations, not 700, and
        the whole heap seldom: a 10,000-scan upload allocates ~1M objects, and the default
        thresholds spent a tenth of its time in ~230 collections, two of them over the whole
        heap. Not every 50,000 either: a collection walks the young objects with the event loop
        stopped, ~12 ms for 50,000 (every scan in flight waited for it), ~1.5 ms for 5,000.
        Pauses are measured in ``vge_gc_pause_seconds``. Process-wide, so done here, in the
        process's own entry point, not in ``start`` (tests start services in-process)."""
        gc.collect()  # what is garbage now must not be frozen with the rest
        gc.freeze()
        gc.set_threshold(*self.settings.gc_thresholds)
        watch_gc_pauses()

    async def _stop_within_deadline(self) -> None:
        try:
            await asyncio.wait_for(self.stop(), self.settings.stop_timeout_seconds)
        except TimeoutError:
            self.log.error("stop_timed_out", seconds=self.settings.stop_timeout_seconds)

    # -- health ----------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """Liveness of each dependency; ``status`` is ``ok`` only if all needed ones answer and
        the service is serving (started, not stopping): an orchestrator that sees ``ok`` may
        send SIGTERM at once and gets an orderly stop."""
        checks: dict[str, bool] = {
            "serving": self._serving,
            "nats": all(nc is not None and nc.is_connected for nc in (self.nc, self.outbox_nc)),
        }
        try:
            assert self.pool is not None
            async with self.pool.acquire(timeout=1.0) as conn:
                checks["postgres"] = await conn.fetchval("SELECT 1") == 1
        except Exception:  # noqa: BLE001
            checks["postgres"] = False
        if self.redis is not None:
            # Redis is a fast path: without it the service is degraded, not down
            checks["redis"] = await self.redis.ping()
        ok = checks["serving"] and checks["nats"] and checks["postgres"]
        return {
            "service": self.name,
            "status": "ok" if ok else "unavailable",
            "checks": checks,
            "uptime_seconds": round(time.time() - self._started_at, 1),
        }

    def _install_health_routes(self) -> None:
        async def healthz() -> JSONResponse:
            body = await self.health()
            return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

        async def metrics() -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        async def asyncapi() -> JSONResponse:
            from libs.asyncapi import describe

            return JSONResponse(describe(self.name, self.router.routes, self._publishes))

        self.http.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
        self.http.add_api_route("/asyncapi.json", asyncapi, methods=["GET"], include_in_schema=False)
        self.http.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)

    async def _start_http(self) -> None:
        # bound here, not by uvicorn: uvicorn answers a taken port with sys.exit() inside its
        # task, which ends the event loop at once, and asyncio.run's clean-up then waited for
        # ever on a task that swallows its cancellation (the process never exited; seen with
        # audit). Here it is an OSError, a start-up failure like any other (run_until_stopped).
        sock = bind_port(self.http_port, self.settings.http_host)
        config = uvicorn.Config(
            self.http,
            host=self.settings.http_host,
            port=self.http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        self._http_server = uvicorn.Server(config)
        # the runtime owns SIGTERM/SIGINT; uvicorn must not take them over
        self._http_server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[sock]))
        while not self._http_server.started:
            if self._http_task.done():
                self._http_task.result()  # raises why the server did not start
            await asyncio.sleep(0.02)
        sockets = self._http_server.servers[0].sockets
        self.http_port = sockets[0].getsockname()[1]

    # -- NATS connections ----------------------------------------------------------------------

    async def _connect_nats(self, name: str, *,
                            catch_up: Sequence[Callable[[], Awaitable[None]]] = ()) -> NATS:
        s = self.settings
        assert s.nats_url

        async def error(exc: Exception) -> None:
            self.log.warning("nats_error", connection=name, error=repr(exc))

        async def disconnected() -> None:
            # (our own drain at shutdown disconnects too: that is no warning)
            if self._stopping:
                self.log.info("nats_closed", connection=name)
            else:
                self.log.warning("nats_disconnected", connection=name)

        async def reconnected() -> None:
            self.log.info("nats_reconnected", connection=name)
            for fn in catch_up:
                try:
                    await fn()
                except Exception:  # noqa: BLE001 - one hook's failure must not end the others
                    self.log.exception("reconnect_hook_failed", connection=name, hook=repr(fn))

        return await nats.connect(
            nats_servers(s.nats_url),
            name=name,
            **connect_options(s.nats_user, s.nats_password),
            max_reconnect_attempts=-1,  # a service outlives a NATS restart
            reconnect_time_wait=0.5,
            error_cb=error,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
        )


LEFTOVER_TASK_SECONDS = 5.0


def run_service(runtime: ServiceRuntime, *, leftover_seconds: float = LEFTOVER_TASK_SECONDS) -> None:
    """A service process's event loop: ``runtime.run_until_stopped()``, then a clean-up that
    ends. ``asyncio.run`` cancels the tasks left and waits for them without a bound, so one task
    that swallows its cancellation (nats-py's do) keeps the process alive for ever whenever the
    loop ended early (a ``sys.exit()`` inside a task, say), and an orchestrator never restarts
    it. Here the tasks left get ``leftover_seconds``, and the process ends either way."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(runtime.run_until_stopped())
    finally:
        try:
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=leftover_seconds))
                stuck = [t.get_name() for t in left if not t.done()]
                if stuck:
                    log.warning("tasks_left_running_at_exit", tasks=stuck)
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), leftover_seconds))
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), leftover_seconds))
        except (TimeoutError, RuntimeError) as exc:  # a generator or thread that does not end
            log.warning("exit_cleanup_incomplete", error=repr(exc))
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def configure_service_logging(name: str, settings: Settings) -> None:
    """Logging for a service process (kept here so every ``__main__`` is two lines)."""
    configure_logging(settings.log_level, settings.log_format, service=name)
