"""The one database access layer: asyncpg pools, tenant-scoped transactions, service logins.

Every tenant table has row-level security keyed on the transaction-local setting
``vge.org_id`` (see ``libs/sql/vge_bootstrap.sql``). ``tenant_transaction`` is the only way a
service touches tenant rows: it sets the tenant with ``set_config(..., true)`` (``SET LOCAL``),
so the setting dies with the transaction and never leaks to the next user of a pooled
connection.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import AsyncIterator, Callable
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import orjson

from libs.actor import Actor
from libs.errors import Forbidden, Unavailable
from libs.log import get_logger

__all__ = [
    "create_pool",
    "tenant_transaction",
    "tenant_transaction_on",
    "transaction_on",
    "after_commit",
    "rollback_quietly",
    "platform_read_transaction",
    "service_role",
    "service_dsn",
    "check_identifier",
    "mark_processed",
    "CONNECTION_ERRORS",
]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")

# What "the database is not answering" looks like to asyncpg; callers map it to Unavailable.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    TimeoutError,
)


def check_identifier(name: str) -> str:
    """Schema and role names are interpolated into SQL: allow only plain lowercase names."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a safe SQL identifier: {name!r}")
    return name


def service_role(schema: str) -> str:
    """The login role of a service (it does not own its tables)."""
    return f"vge_{check_identifier(schema)}"


def service_dsn(admin_dsn: str, schema: str, password: str) -> str:
    """The service's own DSN: the admin DSN's host and database, the service role's login."""
    parts = urlsplit(admin_dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(service_role(schema))}:{quote(password)}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON in and out as Python objects, everywhere, the same way (orjson: several times faster
    # than the standard library on the scan batches)
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=_json_text, decoder=orjson.loads, schema="pg_catalog")


def _json_text(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset that sends nothing (asyncpg still rolls back an open transaction first)."""


async def create_pool(
    dsn: str, *, schema: str, min_size: int = 1, max_size: int = 10, **kwargs: object
) -> asyncpg.Pool:
    """A pool whose connections see ``schema`` first, then the shared ``vge`` functions.

    A released connection is not reset with asyncpg's reset query (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL): that is one more round trip on every use, in the latency of every
    batch of scans. Our connections keep no session state to reset: the tenant is set
    transaction-locally, no cursor outlives its transaction, and the two session-level things
    clean up after themselves or drop their connection (the outbox relay's LISTEN, payments'
    saga lock). asyncpg still rolls back a transaction left open."""
    check_identifier(schema)
    kwargs.setdefault("reset", _keep_session)
    server_settings = {"search_path": f"{schema},vge", "application_name": f"vge-{schema}"}
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            server_settings=server_settings,
            **kwargs,
        )
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"database not reachable: {exc}") from exc


@asynccontextmanager
async def tenant_transaction(
    pool: asyncpg.Pool, org_id: UUID | str, *, readonly: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction in which row-level security shows and accepts only ``org_id``'s rows."""
    async with pool.acquire() as conn:
        async with tenant_transaction_on(conn, org_id, readonly=readonly):
            yield conn


@asynccontextmanager
async def tenant_transaction_on(
    conn: asyncpg.Connection, org_id: UUID | str, *, readonly: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """``tenant_transaction`` on a connection the caller already holds (e.g. with a session
    lock on it).

    One round trip to open: BEGIN and the transaction-local tenant travel as one simple query.
    The tenant id is inlined, which is safe because it is rendered from a ``UUID``.
    """
    org = str(UUID(str(org_id)))
    mode = " READ ONLY" if readonly else ""
    async with _committing(conn, f"BEGIN{mode}; SELECT set_config('vge.org_id', '{org}', true)"):
        yield conn


@asynccontextmanager
async def transaction_on(conn: asyncpg.Connection, *, isolation: str = "read committed",
                         readonly: bool = False) -> AsyncIterator[asyncpg.Connection]:
    """A transaction with no tenant set, for a service's own writes across tenants (the audit
    log's chains); unlike asyncpg's ``conn.transaction()``, ``after_commit`` works in it."""
    if isolation not in ("read committed", "repeatable read", "serializable"):
        raise ValueError(f"unknown isolation level {isolation!r}")
    mode = " READ ONLY" if readonly else ""
    async with _committing(conn, f"BEGIN ISOLATION LEVEL {isolation.upper()}{mode}"):
        yield conn


@asynccontextmanager
async def _committing(conn: asyncpg.Connection, begin: str) -> AsyncIterator[None]:
    """Run ``begin``, then COMMIT after the block (ROLLBACK if it raised), then the block's
    ``after_commit`` callbacks."""
    await conn.execute(begin)
    pending = _Commit()
    token = _AFTER_COMMIT.set(pending)
    try:
        try:
            yield
        except BaseException:
            await rollback_quietly(conn)
            raise
        await conn.execute("COMMIT")
    finally:
        _AFTER_COMMIT.reset(token)
        # a task started inside the block holds a copy of this context: what it registers
        # after the end is refused, not silently never run
        pending.ended = True
    for fn in pending.callbacks:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the transaction has committed: never report it failed
            _log.warning("after_commit_failed", callback=repr(fn), error=repr(exc))


class _Commit:
    """The ``after_commit`` callbacks of one ``libs.db`` transaction."""

    __slots__ = ("callbacks", "ended")

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.ended = False


_log = get_logger(__name__)

# the transaction the current task is in (see after_commit)
_AFTER_COMMIT: ContextVar[_Commit | None] = ContextVar("vge_after_commit", default=None)


def after_commit(fn: Callable[[], None]) -> bool:
    """Call ``fn`` once the transaction this task is in (``tenant_transaction`` and the like,
    ``transaction_on``) has committed; never if it rolls back. False, and nothing registered,
    outside one (e.g. in asyncpg's own ``conn.transaction()``)."""
    pending = _AFTER_COMMIT.get()
    if pending is None or pending.ended:
        return False
    pending.callbacks.append(fn)
    return True


async def rollback_quietly(conn: asyncpg.Connection) -> None:
    """Roll back the connection's open transaction, if any, never raising."""
    # If the connection is unusable (a query cancelled mid-flight) the pool resets or discards
    # it; keep the original error either way.
    try:
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute("ROLLBACK")
    except Exception:  # noqa: BLE001
        pass


@asynccontextmanager
async def platform_read_transaction(
    pool: asyncpg.Pool, actor: Actor
) -> AsyncIterator[asyncpg.Connection]:
    """A read-only transaction across every tenant, for platform admins only.

    The caller must audit the read (design §4: a cross-tenant read is itself recorded).
    """
    if not actor.is_platform_admin:
        raise Forbidden("only a platform admin may read across tenants")
    async with pool.acquire() as conn:
        async with conn.transaction(readonly=True):
            await conn.execute("SELECT set_config('vge.platform_read', 'on', true)")
            yield conn


async def mark_processed(conn: asyncpg.Connection, consumer: str, event_id: UUID) -> bool:
    """Record that ``consumer`` applied ``event_id``; False if it already had.

    Call it inside the transaction that applies the event (a tracking record), so the change
    and the record commit together and a redelivered event is skipped.
    """
    row = await conn.fetchval(
        "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2) "
        "ON CONFLICT DO NOTHING RETURNING 1",
        consumer,
        event_id,
    )
    return row is not None
