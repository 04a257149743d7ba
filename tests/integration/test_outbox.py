"""The outbox: a row committed while NATS is down is published exactly once after it returns."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import DiscardPolicy, StreamConfig
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from libs.actor import Actor
from libs.db import after_commit, create_pool, service_dsn, tenant_transaction, transaction_on
from libs.envelope import Envelope
from libs.jetstream import ensure_streams
from libs.migrations import migrate
import libs.migrations
import libs.outbox
from libs.outbox import OutboxRelay, PublishRefused, add_events, outbox_committed
from libs.servers import NatsServer
from libs.subjects import EVENTS_STREAM

PASSWORD = "pw"


async def _wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


@pytest.fixture
async def pool(admin_dsn, schema):
    await migrate(admin_dsn, schema, None, role_password=PASSWORD)
    pool = await create_pool(service_dsn(admin_dsn, schema, PASSWORD), schema=schema)
    yield pool
    await pool.close()


def _unconfirmed(schema: str) -> float | None:
    """Events of the relay pass under way that JetStream has not confirmed yet."""
    return REGISTRY.get_sample_value("vge_outbox_unconfirmed", {"service": schema})


def _event(org: uuid.UUID, n: int) -> Envelope:
    return Envelope(
        type="sample.created", org_id=org, actor=Actor.system("test", org),
        correlation_id=f"corr-{n}", data={"n": n},
    )


async def _stream_messages(js, subject: str) -> list[bytes]:
    out = []
    sub = await js.pull_subscribe(subject, stream=EVENTS_STREAM)
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:  # nats-py raises its own subclass or the plain one
                break
            for m in msgs:
                out.append(m)
                await m.ack()
    finally:
        await sub.unsubscribe()
    return out


async def test_committed_while_nats_down_is_published_exactly_once(pool, schema, tmp_path: Path):
    server = NatsServer(tmp_path / "nats").start()
    org = uuid.uuid4()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        relay = OutboxRelay(pool, nc, schema, poll_interval=0.2, publish_timeout=0.5)
        relay.start()

        server.stop()  # outage
        events = [_event(org, n) for n in range(5)]
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, schema, events)
        await asyncio.sleep(1.5)  # the relay tries and fails meanwhile
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 5

        server.start()  # NATS is back (same port, same JetStream store)

        async def all_published():
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 0

        await _wait_for(all_published)
        await relay.stop()
        assert _unconfirmed(schema) == 0  # the failed passes left no pass waiting for answers

        subject = f"vge.evt.{org}.{schema}.sample.created"
        msgs = await _stream_messages(js, subject)
        ids = [m.headers["Nats-Msg-Id"] for m in msgs]
        assert sorted(ids) == sorted(str(e.event_id) for e in events)
        assert len(ids) == len(set(ids)) == 5
        # a re-publish with the same id (the relay crashed before marking it) is dropped
        ack = await js.publish(subject, events[0].to_bytes(), headers={"Nats-Msg-Id": str(events[0].event_id)})
        assert ack.duplicate is True
        assert len(await _stream_messages(js, subject)) == 5
    finally:
        await nc.close()
        server.stop()


async def test_a_relay_stopped_while_awaiting_acks_leaves_no_unretrieved_error(pool, schema, tmp_path: Path):
    """Stopping a service while its relay waits for JetStream's acks is quiet: no future is
    left holding an error nobody reads (Python logs those as "exception was never retrieved")."""
    import gc

    server = NatsServer(tmp_path / "nats").start()
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context["message"]))
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        relay = OutboxRelay(pool, nc, schema, poll_interval=0.2, publish_timeout=30)
        relay.start()
        server.stop()  # the publishes wait in the client's buffer; no ack comes
        async with tenant_transaction(pool, uuid.uuid4()) as conn:
            await add_events(conn, schema, [_event(uuid.uuid4(), n) for n in range(3)])
        await _wait_for(lambda: asyncio.sleep(0, _unconfirmed(schema) == 3))
        await relay.stop()  # mid-pass
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()
        assert unretrieved == []
    finally:
        loop.set_exception_handler(previous)
        server.start()  # (a client closing while it reconnects fails its own close)
        await _wait_for(lambda: asyncio.sleep(0, nc.is_connected))
        await nc.close()
        server.stop()


async def test_crash_between_publish_and_mark_publishes_once(pool, schema, nc):
    """Simulate the relay dying after publishing: the rows stay unpublished, the next pass
    publishes them again and JetStream drops the copies."""
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    events = [_event(org, n) for n in range(3)]
    async with tenant_transaction(pool, org) as conn:
        await add_events(conn, schema, events)
    for e in events:  # what a relay published just before it crashed
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT subject, payload FROM outbox WHERE event_id = $1", e.event_id)
        await js.publish(row["subject"], row["payload"], headers={"Nats-Msg-Id": str(e.event_id)})
    relay = OutboxRelay(pool, nc, schema)
    assert await relay.publish_pending() == 3
    assert await relay.publish_pending() == 0
    msgs = await _stream_messages(js, f"vge.evt.{org}.>")
    assert len(msgs) == 3


async def test_an_event_jetstream_refuses_fails_the_pass_and_nothing_is_marked_sent(pool, schema, nc):
    await ensure_streams(nc.jetstream())
    org = uuid.uuid4()
    async with tenant_transaction(pool, org) as conn:
        # a subject no stream takes (a bug in a service's subject, or a stream deleted)
        await conn.execute("INSERT INTO outbox (event_id, organization_id, subject, payload) "
                           "VALUES ($1, $2, $3, $4)", uuid.uuid4(), org, f"vge.nostream.{org}", b"{}")
        await add_events(conn, schema, [_event(org, 1)])
    relay = OutboxRelay(pool, nc, schema, publish_timeout=5.0)
    with pytest.raises(PublishRefused):
        await relay.publish_pending()
    assert _unconfirmed(schema) == 0
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 2


async def test_an_event_a_full_stream_refuses_fails_the_pass(pool, schema, nc):
    # JetStream's own refusal ({"error": ...} from the server, not a missing stream): the
    # stream keeps one message and takes no new one when full
    js = nc.jetstream()
    org = uuid.uuid4()
    stream = f"FULL_{schema}".upper()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"vge.full.{org}"], max_msgs=1,
                                     discard=DiscardPolicy.NEW))
    try:
        async with tenant_transaction(pool, org) as conn:
            for _ in range(2):
                await conn.execute("INSERT INTO outbox (event_id, organization_id, subject, payload) "
                                   "VALUES ($1, $2, $3, $4)", uuid.uuid4(), org, f"vge.full.{org}", b"{}")
        with pytest.raises(PublishRefused, match="maximum messages"):
            await OutboxRelay(pool, nc, schema, publish_timeout=5.0).publish_pending()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 2
        assert (await js.stream_info(stream)).state.messages == 1  # the first was stored
    finally:
        await js.delete_stream(stream)


async def test_two_relays_share_the_outbox_without_duplicates(pool, schema, nc):
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    events = [_event(org, n) for n in range(300)]
    async with tenant_transaction(pool, org) as conn:
        await add_events(conn, schema, events)
    relays = [OutboxRelay(pool, nc, schema, batch_size=50) for _ in range(2)]
    counts = [0, 0]

    async def drain(i):
        while (n := await relays[i].publish_pending()):
            counts[i] += n

    await asyncio.gather(drain(0), drain(1))
    assert sum(counts) == 300
    assert len(await _stream_messages(js, f"vge.evt.{org}.>")) == 300


async def test_an_event_committed_during_a_relay_pass_is_published_at_once(pool, schema, nc):
    """The commit's wake-up arrives while the relay is still publishing the batch before: the
    relay must go round again at once, not wait for its poll (30 s here)."""
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    relay = OutboxRelay(pool, nc, schema, poll_interval=30.0)
    original = relay._publish_batch
    passes = 0

    async def pass_during_which_another_event_commits() -> tuple[int, bool]:
        nonlocal passes
        passes += 1
        published = await original()
        if passes == 2:  # the pass that published the first event: now the second commits
            async with tenant_transaction(pool, org) as conn:
                await add_events(conn, schema, [_event(org, 2)])
            await asyncio.sleep(0.3)  # its wake-up is in before this pass ends
        return published

    relay._publish_batch = pass_during_which_another_event_commits  # type: ignore[method-assign]
    relay.start()
    try:
        await asyncio.sleep(0.3)  # the first pass found nothing; the relay is listening
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, schema, [_event(org, 1)])

        async def both_published():
            async with pool.acquire() as conn:
                return await conn.fetchval(
                    "SELECT (SELECT count(*) FROM outbox) = 2 "
                    "AND NOT EXISTS (SELECT FROM outbox_unpublished)")

        await _wait_for(both_published, timeout=5.0)
    finally:
        await relay.stop()
    assert len(await _stream_messages(js, f"vge.evt.{org}.>")) == 2


async def test_an_urgent_wake_up_does_not_wait_for_the_relays_turn(pool, schema, nc):
    """Passes start at most every ``min_pass_interval`` (60 s here): a commit's wake-up waits for
    the relay's next turn, an urgent one starts a pass at once, which takes every row waiting."""
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    relay = OutboxRelay(pool, nc, schema, poll_interval=3600.0, min_pass_interval=60.0)

    async def unpublished() -> int:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT count(*) FROM outbox_unpublished")

    relay.start()
    try:
        await asyncio.sleep(0.3)  # the first pass found nothing: the next turn is a minute away
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, schema, [_event(org, 1)])  # (wakes the relay, not urgently)
        await asyncio.sleep(0.5)
        assert await unpublished() == 1  # waiting for the turn
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, schema, [_event(org, 2)])
        outbox_committed(schema, urgent=True)

        async def none_left() -> bool:
            return await unpublished() == 0

        await _wait_for(none_left, timeout=10.0)
    finally:
        await relay.stop()
    assert len(await _stream_messages(js, f"vge.evt.{org}.>")) == 2


async def test_a_transaction_that_commits_late_is_published_first_and_never_skipped(pool, schema, nc,
                                                                                   monkeypatch):
    """The relay keeps a position, not a mark per row: an event written by a transaction that
    is still open when a later one commits must hold the later one back (with a warning when
    that lasts), then go out first. Nothing wakes the relay for the late commit here (a raw
    connection, a 1-hour poll)."""
    monkeypatch.setattr(libs.outbox, "HELD_BACK_WARNING_SECONDS", 0.2)
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    relay = OutboxRelay(pool, nc, schema, poll_interval=3600.0)
    relay.start()
    early, late = _event(org, 1), _event(org, 2)
    try:
        async with pool.acquire() as open_conn:
            open_tx = open_conn.transaction()
            await open_tx.start()
            try:
                await open_conn.execute("SELECT set_config('vge.org_id', $1, true)", str(org))
                # the first write gives this transaction its id, before the other one's
                await open_conn.execute(
                    "INSERT INTO outbox (event_id, organization_id, subject, payload) "
                    "VALUES ($1, $2, $3, $4)",
                    early.event_id, org, f"vge.evt.{org}.{schema}.sample.created", early.to_bytes())
                open_xid = int(await open_conn.fetchval("SELECT pg_current_xact_id()::text"))
                with capture_logs() as logs:
                    async with tenant_transaction(pool, org) as conn:
                        await add_events(conn, schema, [late])  # commits, and wakes the relay
                    await asyncio.sleep(0.5)
                warnings = [e for e in logs if e["event"] == "outbox_held_back_by_open_transaction"]
                assert any(e["schema"] == schema for e in warnings)
                # it names the transaction that holds the events back, as pg_stat_activity shows it
                assert all(e["oldest_open_xid"] == open_xid and e["backend_xid"] == open_xid % 2**32
                           for e in warnings if e["schema"] == schema)
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 1  # the late one
                assert await _stream_messages(js, f"vge.evt.{org}.>") == []
            except BaseException:
                await open_tx.rollback()  # (a pooled connection is not reset on release)
                raise
            await open_tx.commit()

        async def both_published():
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT NOT EXISTS (SELECT FROM outbox_unpublished)")

        await _wait_for(both_published, timeout=5.0)
    finally:
        await relay.stop()
    published = [Envelope.from_bytes(m.data).event_id for m in await _stream_messages(js, f"vge.evt.{org}.>")]
    assert published == [early.event_id, late.event_id]


async def test_the_lag_shows_how_long_an_open_transaction_holds_events_back(pool, schema, nc):
    """``vge_outbox_lag_seconds``: how long the oldest committed event has waited at the relay's
    last pass. An operator's alert on it sees a transaction left open (anywhere in the
    database: the relay waits for every older one) before dashboards go stale."""
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    relay = OutboxRelay(pool, nc, schema, poll_interval=3600.0)
    relay.start()
    try:
        async with pool.acquire() as open_conn:
            open_tx = open_conn.transaction()
            await open_tx.start()
            try:
                await open_conn.execute("SELECT pg_current_xact_id()")  # an id, older than the event's
                async with tenant_transaction(pool, org) as conn:
                    await add_events(conn, schema, [_event(org, 1)])  # commits, and wakes the relay
                await asyncio.sleep(0.6)  # (passes every min_pass_interval while held back)
                assert _lag(schema) >= 0.4
                assert await _stream_messages(js, f"vge.evt.{org}.>") == []
            finally:
                await open_tx.rollback()

        async def published():
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT NOT EXISTS (SELECT FROM outbox_unpublished)")

        await _wait_for(published, timeout=5.0)
        await relay.publish_pending()  # a pass with nothing waiting
        assert _lag(schema) == 0.0
    finally:
        await relay.stop()


def _lag(schema: str) -> float | None:
    return REGISTRY.get_sample_value("vge_outbox_lag_seconds", {"service": schema})


async def test_publishing_rewrites_no_outbox_row(pool, schema, nc):
    """Published means behind the relay's position: the rows themselves stay as written (a
    mark per row was a second write of every event)."""
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    async with tenant_transaction(pool, org) as conn:
        await add_events(conn, schema, [_event(org, n) for n in range(3)])
    async with pool.acquire() as conn:
        versions = await conn.fetch("SELECT id, xmin::text, ctid::text FROM outbox ORDER BY id")
        assert await OutboxRelay(pool, nc, schema).publish_pending() == 3
        assert await conn.fetch("SELECT id, xmin::text, ctid::text FROM outbox ORDER BY id") == versions
        assert await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 0
    assert len(await _stream_messages(js, f"vge.evt.{org}.>")) == 3


async def test_upgrading_publishes_what_was_unpublished_and_nothing_published_before_it(
        admin_dsn, schema, nc, tmp_path, monkeypatch):
    """An outbox from before the relay's position (rows marked one by one): the upgrade starts
    the position just before the first unpublished row."""
    before = tmp_path / "sql"
    before.mkdir()
    for name in ("0001_outbox.sql", "0002_outbox_notify_on_request.sql"):
        (before / name).write_text((libs.migrations.SHARED_MIGRATIONS / name).read_text())
    with monkeypatch.context() as m:
        m.setattr(libs.migrations, "SHARED_MIGRATIONS", before)
        await migrate(admin_dsn, schema, None, role_password=PASSWORD)
    org = uuid.uuid4()
    events = [_event(org, n) for n in range(4)]
    admin = await asyncpg.connect(admin_dsn)
    try:
        for n, e in enumerate(events):  # the third still unpublished
            await admin.execute(
                f"INSERT INTO {schema}.outbox (event_id, organization_id, subject, payload, published_at) "
                "VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN now() END)",
                e.event_id, org, f"vge.evt.{org}.{schema}.sample.created", e.to_bytes(), n != 2)
    finally:
        await admin.close()
    await migrate(admin_dsn, schema, None, role_password=PASSWORD)
    pool = await create_pool(service_dsn(admin_dsn, schema, PASSWORD), schema=schema)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        assert await OutboxRelay(pool, nc, schema).publish_pending() == 2
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox_unpublished") == 0
    finally:
        await pool.close()
    published = [Envelope.from_bytes(m.data).event_id for m in await _stream_messages(js, f"vge.evt.{org}.>")]
    assert published == [events[2].event_id, events[3].event_id]


async def test_a_stopped_relay_leaves_no_pooled_connection_listening(admin_dsn, schema, nc, monkeypatch):
    # The pool hands connections back without asyncpg's reset query (no UNLISTEN *): the relay
    # must unlisten itself, or drop its connection when it cannot.
    await migrate(admin_dsn, schema, None, role_password=PASSWORD)
    pool = await create_pool(service_dsn(admin_dsn, schema, PASSWORD), schema=schema, min_size=2, max_size=2)
    try:
        for broken in (False, True):
            relay = OutboxRelay(pool, nc, schema, poll_interval=0.2)
            relay.start()
            listening = await _wait_for(lambda: _listen_conn_of(relay))
            assert [r[0] for r in await listening.fetch("SELECT pg_listening_channels()")] == [
                f"vge_outbox_{schema}"]
            if broken:
                async def fail(*_):
                    raise ConnectionError("connection lost while unlistening")
                monkeypatch.setattr(asyncpg.Connection, "remove_listener", fail)
            await relay.stop()
            async with pool.acquire() as a, pool.acquire() as b:  # every pooled connection
                for conn in (a, b):
                    assert await conn.fetch("SELECT pg_listening_channels()") == []
                    if broken:
                        assert conn is not listening
    finally:
        await pool.close()


async def _listen_conn_of(relay: OutboxRelay):
    return relay._listen_conn  # (async: _wait_for awaits its predicate)


async def test_a_commit_wakes_its_own_process_relay_without_notifying(pool, schema, nc, outbox_notifications):
    # a notifying commit holds a database-wide lock through its WAL flush (libs/sql/0002): with
    # a relay of the schema in this process, the commit wakes it and the database says nothing.
    # With an hour's poll interval, only that wake-up can publish in time.
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    relay = OutboxRelay(pool, nc, schema, poll_interval=3600.0)
    relay.start()
    heard = await outbox_notifications(schema)
    try:
        await asyncio.sleep(0.2)  # the relay's first pass found nothing: it waits now
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, schema, [_event(org, 1)])

        async def published():
            return len(await _stream_messages(js, f"vge.evt.{org}.>")) == 1

        await _wait_for(published, timeout=10.0)
        await asyncio.sleep(0.2)  # (a notification would be in by now)
        assert heard == []
    finally:
        await relay.stop()


async def test_a_writer_with_no_relay_in_its_process_has_the_database_notify(pool, schema,
                                                                           outbox_notifications):
    # e.g. the vge CLI: the relay that must publish its rows runs in the service's process
    heard = await outbox_notifications(schema)
    org = uuid.uuid4()
    async with tenant_transaction(pool, org) as conn:
        await add_events(conn, schema, [_event(org, 1)])
    await _wait_for(lambda: asyncio.sleep(0, heard), timeout=5.0)
    # an outbox row written outside a libs.db tenant transaction notifies as well, as does
    # nothing else: a row inserted without add_events (a service's SQL function) does not
    async with pool.acquire() as conn:
        async with conn.transaction():
            await add_events(conn, schema, [_event(org, 2)])
        await _wait_for(lambda: asyncio.sleep(0, len(heard) == 2), timeout=5.0)
        await conn.execute("SELECT set_config('vge.org_id', $1, false)", str(org))
        await conn.execute(
            "INSERT INTO outbox (event_id, organization_id, subject, payload) VALUES ($1, $2, 's', '')",
            uuid.uuid4(), org)
    await asyncio.sleep(0.3)
    assert len(heard) == 2


async def test_after_commit_runs_after_a_commit_only(pool):
    ran: list[str] = []
    assert after_commit(lambda: ran.append("outside")) is False  # no transaction to wait for
    async with tenant_transaction(pool, uuid.uuid4()) as conn:
        assert after_commit(lambda: ran.append("committed")) is True
        assert await conn.fetchval("SELECT 1") == 1
        assert ran == []  # not yet: the transaction is still open
    assert ran == ["committed"]
    with pytest.raises(RuntimeError):
        async with tenant_transaction(pool, uuid.uuid4()):
            after_commit(lambda: ran.append("rolled back"))
            raise RuntimeError("the change fails")
    assert ran == ["committed"]
    assert after_commit(lambda: ran.append("after")) is False
    async with pool.acquire() as conn:  # a transaction of no tenant (the audit log's)
        async with transaction_on(conn, isolation="repeatable read"):
            assert await conn.fetchval("SHOW transaction_isolation") == "repeatable read"
            assert after_commit(lambda: ran.append("no tenant")) is True
            assert ran == ["committed"]
        assert ran == ["committed", "no tenant"] and not conn.is_in_transaction()
    # a task started inside a transaction (its context copied) that registers after the end
    ended = asyncio.Event()

    async def late() -> bool:
        await ended.wait()
        return after_commit(lambda: ran.append("late"))

    async with tenant_transaction(pool, uuid.uuid4()):
        task = asyncio.create_task(late())
    ended.set()
    assert await task is False and ran == ["committed", "no tenant"]


async def test_a_failing_after_commit_callback_never_fails_the_committed_transaction(pool, schema):
    def broken() -> None:
        raise RuntimeError("Event loop is closed")  # e.g. a relay of a loop that has ended

    org = uuid.uuid4()
    async with tenant_transaction(pool, org) as conn:
        after_commit(broken)
        await add_events(conn, schema, [_event(org, 1)])
    async with pool.acquire() as conn:  # it committed, and the caller saw no error
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1", org) == 1


def test_a_relay_whose_loop_has_closed_is_forgotten_not_raised(schema):
    class LeftOver:  # a relay never stopped, its event loop gone: waking it raises
        def wake(self, *, urgent: bool = False) -> None:
            raise RuntimeError("Event loop is closed")

    libs.outbox._relays[schema] = {LeftOver()}
    try:
        outbox_committed(schema)
        assert libs.outbox._relays[schema] == set()
    finally:
        libs.outbox._relays.pop(schema, None)


async def _outbox_of_published_and_old(admin_dsn: str, schema: str, org: uuid.UUID, *, rows: int,
                                       published: int, old: list[int]) -> list[int]:
    """``rows`` outbox rows (their ids, in order): the first ``published`` behind the relay's
    position, those at the positions ``old`` written 25 hours ago (past the 24 h retention)."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        ids = [r["id"] for r in await conn.fetch(
            f"INSERT INTO {schema}.outbox (event_id, organization_id, subject, payload) "
            "SELECT gen_random_uuid(), $1::uuid, 'vge.evt.' || $1::uuid || '.sample.created', '\\x00' "
            "FROM generate_series(1, $2) RETURNING id", org, rows)]
        ids.sort()
        await conn.execute(f"UPDATE {schema}.outbox SET created_at = now() - interval '25 hours' "
                           "WHERE id = ANY($1::bigint[])", [ids[i] for i in old])
        await conn.execute(f"UPDATE {schema}.outbox_relay r SET txid = o.txid, id = o.id "
                           f"FROM {schema}.outbox o WHERE o.id = $1", ids[published - 1])
    finally:
        await conn.close()
    return ids


async def test_a_purge_deletes_the_published_rows_past_the_retention_and_nothing_else(
        pool, schema, nc, admin_dsn):
    org = uuid.uuid4()
    # 1-10 published and old: purged. 11-15 published, young; 16-20 old, not published yet;
    # 21-25 neither: all kept
    ids = await _outbox_of_published_and_old(admin_dsn, schema, org, rows=25, published=15,
                                             old=[*range(10), *range(15, 20)])
    relay = OutboxRelay(pool, nc, schema)
    assert await relay.purge_published(chunk=3, pause=0) == 10  # four transactions: 3, 3, 3, 1
    async with pool.acquire() as conn:
        assert [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")] == ids[10:]
    assert await relay.purge_published(chunk=3, pause=0) == 0


async def test_a_purge_skips_a_locked_row_instead_of_waiting_for_it(pool, schema, nc, admin_dsn):
    # a replica's purge under way (or anything else) holds a row lock: this purge goes on
    # without it (a purge that waited would also hold back every relay: its transaction's id
    # is older than every row written meanwhile)
    org = uuid.uuid4()
    ids = await _outbox_of_published_and_old(admin_dsn, schema, org, rows=5, published=5, old=list(range(5)))
    locker = await asyncpg.connect(admin_dsn)
    try:
        async with locker.transaction():
            await locker.execute(f"SELECT 1 FROM {schema}.outbox WHERE id = $1 FOR UPDATE", ids[1])
            relay = OutboxRelay(pool, nc, schema)
            assert await asyncio.wait_for(relay.purge_published(chunk=2, pause=0), 5.0) == 4
        async with pool.acquire() as conn:
            assert [r["id"] for r in await conn.fetch("SELECT id FROM outbox ORDER BY id")] == [ids[1]]
        assert await relay.purge_published(pause=0) == 1  # the lock is gone: the next purge has it
    finally:
        await locker.close()


async def test_a_purge_never_holds_up_publishing(pool, schema, nc):
    # a purge that takes as long as it takes (here: forever) runs beside the relay's passes
    js = nc.jetstream()
    await ensure_streams(js)
    org = uuid.uuid4()
    purging = asyncio.Event()

    async def purge_forever(**_: object) -> int:
        purging.set()
        await asyncio.Event().wait()
        return 0

    relay = OutboxRelay(pool, nc, schema, poll_interval=0.1)
    relay.purge_published = purge_forever  # type: ignore[method-assign]
    relay.start()  # it purges at once, then every purge_interval
    try:
        await asyncio.wait_for(purging.wait(), 5.0)
        async with tenant_transaction(pool, org) as conn:
            await add_events(conn, schema, [_event(org, 1)])

        async def published():
            return len(await _stream_messages(js, f"vge.evt.{org}.>")) == 1

        await _wait_for(published, timeout=10.0)
    finally:
        await relay.stop()
