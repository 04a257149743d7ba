"""The transactional outbox (design §4.3) and its relay to JetStream.

A service writes its state change and the event row in one transaction (``add_events``). The
relay publishes unpublished rows to JetStream with ``Nats-Msg-Id`` = event id, then moves the
outbox's one position past them: that is the "marked sent" (``libs/sql/0003``: a mark per row
was a second write of every row). A crash between publish and move republishes the rows, and
JetStream's duplicate window drops the copies; NATS being down only delays publication, the
rows wait. Rows go out in (transaction id, row id) order. Published rows are deleted once past
the retention, in small chunks beside the relay's passes (``OutboxRelay.purge_published``).

Waking the relay: a commit that wrote rows wakes this process's relay of that schema directly
(``add_events`` in a ``libs.db`` transaction does it after the commit; code that writes
rows in its own SQL calls ``outbox_committed``). Only a writer with no relay of the schema in its
process (a CLI), or outside a ``libs.db`` transaction, asks the database to NOTIFY the relay at
commit (``libs/sql/0002``): a notifying commit holds a database-wide lock through its WAL flush,
so concurrent notifying commits flush one after the other. The relay also polls
(``poll_interval``) in case a wake-up is lost.
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

import asyncpg
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge

from libs.background import cancel_and_wait
from libs.db import after_commit, check_identifier
from libs.envelope import Envelope
from libs.log import get_logger
from libs.subjects import event as event_subject

__all__ = ["add_events", "outbox_rows", "outbox_committed", "OutboxRelay", "PublishRefused"]

log = get_logger(__name__)

# a relay held back this long by a transaction still open logs a warning (and again as often)
HELD_BACK_WARNING_SECONDS = 10.0
# published rows past the retention deleted per transaction (``OutboxRelay.purge_published``)
PURGE_CHUNK = 1_000

OUTBOX_PUBLISHED = Counter(
    "vge_outbox_published_total", "Events the outbox relay published", ["service"]
)
OUTBOX_PENDING = Gauge(
    "vge_outbox_pending", "Unpublished outbox rows seen at the last relay pass", ["service"]
)
OUTBOX_LAG = Gauge(
    "vge_outbox_lag_seconds", "Age of the oldest committed event waiting to be published at the relay's "
    "last pass, from its transaction's start (0: none waiting); a transaction left open anywhere in the "
    "database holds every later event back", ["service"]
)
OUTBOX_UNCONFIRMED = Gauge(
    "vge_outbox_unconfirmed", "Events of the relay pass under way that JetStream has not yet confirmed "
    "(set when the pass has published them, 0 when it ends)", ["service"]
)
OUTBOX_FAILURES = Counter(
    "vge_outbox_publish_failures_total", "Relay passes that failed (NATS or DB down)", ["service"]
)


def outbox_rows(
    service: str, events: Iterable[Envelope]
) -> tuple[list[Any], list[Any], list[str], list[bytes]]:
    """The outbox columns (event ids, tenants, subjects, payloads) of ``events``, one list
    each: for a service that inserts its outbox rows inside its own statement (same table,
    same transaction rule as ``add_events``)."""
    ids: list[Any] = []
    orgs: list[Any] = []
    subjects: list[str] = []
    payloads: list[bytes] = []
    for e in events:
        ids.append(e.event_id)
        orgs.append(e.org_id)
        subjects.append(event_subject(e.org_id, service, e.type))
        payloads.append(e.to_bytes())
    return ids, orgs, subjects, payloads


async def add_events(conn: asyncpg.Connection, service: str, events: Iterable[Envelope]) -> None:
    """Queue events in the caller's transaction; they are published after it commits (and the
    relay is woken then: see the module's docstring)."""
    ids, orgs, subjects, payloads = outbox_rows(service, events)
    if not ids:
        return
    if not (_relays.get(service) and after_commit(lambda: outbox_committed(service))):
        # no relay of this schema in this process, or no commit to wait for here: the INSERT's
        # trigger reads this and has the database notify the relay at commit
        await conn.execute("SELECT set_config('vge.outbox_notify', 'on', true)")
    await conn.execute(
        "INSERT INTO outbox (event_id, organization_id, subject, payload) "
        "SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bytea[])",
        list(ids),
        list(orgs),
        list(subjects),
        list(payloads),
    )


# this process's running relays, by schema
_relays: dict[str, set["OutboxRelay"]] = {}


def outbox_committed(schema: str, *, urgent: bool = False) -> None:
    """Wake this process's relays of ``schema``: call right after a commit that wrote outbox
    rows without ``add_events`` (rows inserted by a SQL function). ``urgent``: the next pass
    starts now, not after the relay's ``min_pass_interval`` (see ``OutboxRelay.wake``)."""
    for relay in list(_relays.get(schema, ())):
        try:
            relay.wake(urgent=urgent)
        except RuntimeError:  # its event loop is closed (a relay never stopped): forget it
            _relays[schema].discard(relay)


class PublishRefused(RuntimeError):
    """JetStream refused an event the relay published, or no stream takes its subject."""


class OutboxRelay:
    """Publishes one schema's outbox to JetStream; replicas take turns (an advisory lock per pass)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        nc: NatsClient,
        schema: str,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        publish_timeout: float = 2.0,
        retention_hours: float = 24.0,
        min_pass_interval: float = 0.05,
        purge_interval: float = 600.0,
    ) -> None:
        """``retention_hours``: published rows are kept this long, then deleted (at the start and
        every ``purge_interval`` seconds, see ``purge_published``).

        ``min_pass_interval``: passes start at most this often. Under load every commit
        wakes the relay; a pass per wake-up would cost two statements and a gather for a handful
        of rows, taking CPU from the work that commits. Waiting this long gathers them (an
        event waits at most this much longer; a lone one, not at all). An urgent wake-up
        (``outbox_committed(..., urgent=True)``) starts the pass at once: for the few events
        someone waits to see, such as a dashboard's ``occupancy.changed``.

        ``nc``: best a connection of its own (``libs.runtime`` says why)."""
        self._pool = pool
        self._nc = nc
        self._schema = check_identifier(schema)
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._publish_timeout = publish_timeout
        self._retention_hours = retention_hours
        self._purge_interval = purge_interval
        self._min_pass_interval = min_pass_interval
        self._wakeup = asyncio.Event()
        self._hurry = asyncio.Event()  # an urgent wake-up: no wait for the next turn
        self._task: asyncio.Task[None] | None = None
        self._purge_task: asyncio.Task[None] | None = None
        self._listen_conn: asyncpg.Connection | None = None
        self._held_back_since: float | None = None
        self._held_back_warned = 0.0
        # JetStream's answers to the pass under way (``_publish_and_confirm``)
        self._ack_inbox = ""
        self._ack_sub: Any = None
        self._reply = ""
        self._pass_no = 0
        self._unconfirmed = 0
        self._confirmed: asyncio.Future[None] | None = None

    async def publish_pending(self) -> int:
        """Publish one batch of unpublished rows; returns how many were published."""
        published, _ = await self._publish_batch()
        return published

    async def _publish_batch(self) -> tuple[int, bool]:
        """One pass: (rows published, whether rows are held back behind a transaction still
        open). Rows are read in (txid, id) order up to the first one whose transaction had not
        ended when the pass's snapshot was taken (``libs/sql/0003``): a transaction that began
        earlier and commits later comes first, never behind the position."""
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                # one relay of this outbox at a time (replicas take turns). An advisory lock, not
                # a row lock: a row lock would give this pass a transaction id for all its
                # publishing, and every relay waits for the transactions that have one.
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                                           f"vge.outbox_relay.{self._schema}"):
                    return 0, True  # another replica's pass: perhaps before our commit, so again
                rows = await conn.fetch(
                    # xmin: the oldest transaction still open when this statement began
                    "SELECT o.id, o.txid::text AS txid, o.event_id, o.subject, o.payload, "
                    "pg_snapshot_xmin(pg_current_snapshot())::text AS xmin, "
                    # (since its transaction began: the first row's is the longest wait, near
                    # enough, as rows come in the order their transactions took their ids)
                    "extract(epoch FROM clock_timestamp() - o.created_at)::float8 AS waited "
                    # (LATERAL: the position as the index scan's start; as a join condition
                    # the planner read the whole outbox index and filtered it, ~11 ms per pass
                    # for 40,000 rows)
                    "FROM outbox_relay r, LATERAL (SELECT * FROM outbox o "
                    "WHERE (o.txid, o.id) > (r.txid, r.id) ORDER BY o.txid, o.id LIMIT $1) o "
                    "ORDER BY o.txid, o.id",
                    self._batch_size,
                )
                OUTBOX_PENDING.labels(self._schema).set(len(rows))
                OUTBOX_LAG.labels(self._schema).set(max(0.0, rows[0]["waited"]) if rows else 0.0)
                oldest_open = int(rows[0]["xmin"]) if rows else 0
                ready = next((n for n, r in enumerate(rows) if int(r["txid"]) >= oldest_open), len(rows))
                held_back = ready < len(rows)
                self._note_held_back(held_back, oldest_open)
                rows = rows[:ready]
                if not rows:
                    return 0, held_back
                await self._publish_and_confirm(rows)
                await conn.execute(
                    "UPDATE outbox_relay SET txid = $1::text::xid8, id = $2, updated_at = now()",
                    rows[-1]["txid"], rows[-1]["id"],
                )
        OUTBOX_PUBLISHED.labels(self._schema).inc(len(rows))
        return len(rows), held_back

    async def _publish_and_confirm(self, rows: list[asyncpg.Record]) -> None:
        """Publish the rows, then wait until JetStream has stored every one. If any is refused
        or unanswered the pass fails: its transaction rolls back, the rows come again, and
        JetStream's duplicate window drops the ones it already has.

        Every publish of a pass names the same reply subject, and the answers are counted on
        one subscription: no future, timer or token per event. nats-py's ``publish_async`` (a
        future per event) cost ~37 us of CPU per event, this ~16 us
        (``bench/bench_outbox.py``), in the event loop of the service whose commands wrote the
        rows. An answer to an earlier, failed pass names that pass and is not counted."""
        if self._ack_sub is None:
            self._ack_inbox = self._nc.new_inbox()
            self._ack_sub = await self._nc.subscribe(f"{self._ack_inbox}.*", cb=self._on_ack)
        self._pass_no += 1
        self._reply = reply = f"{self._ack_inbox}.{self._pass_no}"
        self._unconfirmed = len(rows)
        self._confirmed = confirmed = asyncio.get_running_loop().create_future()
        try:
            for r in rows:
                await self._nc.publish(r["subject"], r["payload"], reply=reply,
                                       headers={"Nats-Msg-Id": str(r["event_id"])})
            OUTBOX_UNCONFIRMED.labels(self._schema).set(self._unconfirmed)
            # (asyncio.wait, not wait_for: the future is not cancelled with the pass's timeout,
            # and one ended by a refusal is read below, never left unretrieved)
            await asyncio.wait({confirmed}, timeout=self._publish_timeout)
            if not confirmed.done():
                raise TimeoutError(f"{self._unconfirmed} of {len(rows)} publishes not confirmed")
            confirmed.result()  # PublishRefused
        finally:
            confirmed.cancel()  # a no-op once it has ended; late answers find it done
            OUTBOX_UNCONFIRMED.labels(self._schema).set(0)

    async def _on_ack(self, msg: Msg) -> None:
        confirmed = self._confirmed
        if confirmed is None or confirmed.done() or msg.subject != self._reply:
            return  # an answer to an earlier pass, or this pass has failed already
        # stored: {"stream":..,"seq":..[,"duplicate":true]}; refused: {"error":{..}}; no stream
        # takes the subject: an empty message with a 503 status header
        try:
            answer = orjson.loads(msg.data) if msg.data else {}
        except orjson.JSONDecodeError:
            answer = {}
        if not isinstance(answer, dict) or "error" in answer or "seq" not in answer:
            confirmed.set_exception(PublishRefused(
                msg.data.decode(errors="replace") or f"no stream answered: {msg.headers}"))
            return
        self._unconfirmed -= 1
        if self._unconfirmed == 0:
            confirmed.set_result(None)

    def _note_held_back(self, held_back: bool, oldest_open: int) -> None:
        # a transaction left open (e.g. an idle psql session that wrote) holds back every later
        # event of every outbox: say so once it lasts, and again while it does
        loop_time = asyncio.get_running_loop().time()
        if not held_back:
            self._held_back_since = None
            return
        if self._held_back_since is None:
            self._held_back_since = self._held_back_warned = loop_time
        elif loop_time - self._held_back_warned >= HELD_BACK_WARNING_SECONDS:
            self._held_back_warned = loop_time
            # the transaction to look for: pg_stat_activity's backend_xid is its low 32 bits
            log.warning("outbox_held_back_by_open_transaction", schema=self._schema,
                        oldest_open_xid=oldest_open, backend_xid=oldest_open % 2**32,
                        seconds=round(loop_time - self._held_back_since, 1))

    async def purge_published(self, *, chunk: int = PURGE_CHUNK, pause: float = 0.01) -> int:
        """Delete the published rows written longer ago than the retention; returns how many.

        Oldest first, ``chunk`` rows per transaction, ``pause`` seconds between them, in a task
        beside the relay's passes (``start``). Why: the purge was one DELETE in the relay's loop,
        and for as long as it ran no event went out, in this replica (the loop was busy) or any
        other (every row written meanwhile is newer than the DELETE's transaction, and the relay
        waits for older transactions to end, ``libs/sql/0003``). Purging 300,000 rows of 1.8
        million took ~0.8 s, and an event written every 10 ms meanwhile was published up to
        744-777 ms late; chunked, beside the passes, at most 51-52 ms (the pass interval), the
        purge itself taking ~4.5 s. A row another transaction has locked (a replica's purge) is
        skipped, not waited for: it goes in that one, or in the next purge."""
        async with self._pool.acquire() as conn:
            # ids follow time (created_at is the writing transaction's start, ids are taken as
            # rows are written): the first young row bounds the purge. Reading up to it reads
            # the old rows once, by the primary key, never the whole outbox.
            bound = await conn.fetchval(
                "SELECT coalesce((SELECT id FROM outbox"
                " WHERE created_at >= now() - make_interval(hours => $1) ORDER BY id LIMIT 1),"
                " (SELECT max(id) + 1 FROM outbox))",
                self._retention_hours,
            )
        purged, after = 0, 0
        while bound is not None:
            async with self._pool.acquire() as conn:
                n, last = await conn.fetchrow(
                    "WITH gone AS (DELETE FROM outbox WHERE id = ANY (ARRAY("
                    " SELECT o.id FROM outbox_relay r, outbox o"
                    " WHERE o.id > $1 AND o.id < $2 AND (o.txid, o.id) <= (r.txid, r.id)"
                    # (a row committed since the bound was read may be younger)
                    "  AND o.created_at < now() - make_interval(hours => $4)"
                    " ORDER BY o.id LIMIT $3 FOR UPDATE OF o SKIP LOCKED)) RETURNING id) "
                    "SELECT count(*), max(id) FROM gone",
                    after, bound, chunk, self._retention_hours,
                )
            purged += n
            if n < chunk:
                break
            after = last  # the next chunk starts past this one, not over its dead index entries
            await asyncio.sleep(pause)
        return purged

    async def _purge_every_interval(self) -> None:
        # a task of its own: a purge never holds up publishing
        while True:
            try:
                purged = await self.purge_published()
                if purged:
                    log.info("outbox_purged", schema=self._schema, rows=purged)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - PostgreSQL gone, say: try again next time
                log.warning("outbox_purge_failed", schema=self._schema, error=repr(exc))
            await asyncio.sleep(self._purge_interval)

    def start(self) -> None:
        """Run the relay in the background until ``stop``; commits of this process that write
        the schema's outbox wake it from now on."""
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._schema}")
        self._purge_task = asyncio.create_task(self._purge_every_interval(),
                                               name=f"outbox-purge-{self._schema}")
        _relays.setdefault(self._schema, set()).add(self)

    async def stop(self) -> None:
        """Stop after the current batch."""
        _relays.get(self._schema, set()).discard(self)
        await cancel_and_wait(self._task)
        await cancel_and_wait(self._purge_task)
        self._task = self._purge_task = None
        await self._unlisten()
        sub, self._ack_sub = self._ack_sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be closed
                pass

    def wake(self, *, urgent: bool = False) -> None:
        """Publish soon (called by code of this process that just committed outbox rows): at the
        next turn, ``min_pass_interval`` after the last pass began; ``urgent``, at once."""
        self._wakeup.set()
        if urgent:
            self._hurry.set()

    async def _listen(self) -> None:
        if self._listen_conn is not None and not self._listen_conn.is_closed():
            return
        conn = await self._pool.acquire()
        try:
            await conn.add_listener(self._channel, self._on_notify)
        except BaseException:
            await self._pool.release(conn)
            raise
        self._listen_conn = conn

    @property
    def _channel(self) -> str:
        return f"vge_outbox_{self._schema}"

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def _unlisten(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            try:
                await conn.remove_listener(self._channel, self._on_notify)  # sends UNLISTEN
            except Exception:  # noqa: BLE001 - the connection may already be gone
                # the pool does not reset what it gets back: never pool a connection that may
                # still be listening
                conn.terminate()
            try:
                await self._pool.release(conn)
            except Exception:  # noqa: BLE001
                pass

    async def _run(self) -> None:
        backoff = 0.1
        loop = asyncio.get_running_loop()
        last_pass = -self._min_pass_interval
        while True:
            try:
                await self._listen()
                turn = last_pass + self._min_pass_interval - loop.time()
                if turn > 0 and not self._hurry.is_set():
                    try:
                        await asyncio.wait_for(self._hurry.wait(), turn)
                    except TimeoutError:
                        pass
                self._hurry.clear()
                last_pass = loop.time()
                # cleared before the pass, not after it: a commit notified while this pass runs
                # must start the next one at once, not wait out the poll interval
                self._wakeup.clear()
                published, held_back = await self._publish_batch()
                backoff = 0.1
                if published == self._batch_size or held_back:
                    # more waiting, or rows waiting for an older transaction to end (its commit
                    # may wake another process's relay, not this one): the next pass is the
                    # next turn (min_pass_interval), not a wake-up
                    continue
                try:
                    # the poll interval covers a lost wake-up (e.g. listener reconnecting)
                    await asyncio.wait_for(self._wakeup.wait(), self._poll_interval)
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - PostgreSQL or NATS gone, say: keep relaying
                OUTBOX_FAILURES.labels(self._schema).inc()
                log.warning("outbox_relay_retry", schema=self._schema, error=repr(exc), wait=backoff)
                await self._unlisten()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
