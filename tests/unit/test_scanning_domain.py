"""Scanning's pure logic: the dedup tiers' rules, the apply order, the breaker, the batcher."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from libs.contracts.scanning import Direction, OfflineScan
from services.scanning.adapters.batching import DecisionBatcher
from services.scanning.domain import (
    Admission,
    AdmissionCache,
    Breaker,
    claim_key,
    decode_admission,
    duplicate_of,
    encode_admission,
    offline_apply_order,
)

EVENT = uuid.uuid4()
ORG = uuid.uuid4()
NOW = datetime(2026, 11, 22, 18, 0, tzinfo=UTC)
ADMISSION = Admission(EVENT, "GA", NOW, "North", "device-1", "n1")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_survives_redis_encoding_and_garbage_is_ignored():
    assert decode_admission(encode_admission(ADMISSION)) == ADMISSION
    for bad in (None, "", "pending", "{}", '{"event_id": "nope"}', "[1]"):
        assert decode_admission(bad) is None
    assert claim_key(ORG, "TKT-1") == f"voelgoed:scans:{ORG}:TKT-1"


@pytest.mark.parametrize(
    ("direction", "event_id", "device", "nonce", "duplicate"),
    [
        (Direction.ENTRY, EVENT, "device-2", "x", True),  # another gate: a duplicate
        (Direction.ENTRY, EVENT, "device-1", "n2", True),  # same gate, new scan: a duplicate
        (Direction.ENTRY, EVENT, "device-1", "n1", False),  # the admitting scan's retry
        (Direction.EXIT, EVENT, "device-2", "x", False),  # exits are the authority's
        (Direction.ENTRY, uuid.uuid4(), "device-2", "x", False),  # another event: wrong_event
    ],
)
def test_known_duplicate_rules(direction, event_id, device, nonce, duplicate):
    got = duplicate_of(ADMISSION, event_id=event_id, direction=direction, device_id=device, nonce=nonce)
    assert (got is ADMISSION) is duplicate
    assert duplicate_of(None, event_id=EVENT, direction=Direction.ENTRY, device_id="d", nonce="n") is None


def test_cache_expires_keeps_the_first_and_stays_bounded():
    clock = Clock()
    cache = AdmissionCache(ttl_seconds=10, max_entries=2, clock=clock)
    cache.put(ORG, "a", ADMISSION)
    later = Admission(EVENT, "GA", NOW + timedelta(minutes=1), "South", "device-2", "n9")
    cache.put(ORG, "a", later)
    assert cache.get(ORG, "a") == ADMISSION  # the first admission stays
    cache.put(ORG, "a", later, replace=True)
    assert cache.get(ORG, "a") == later  # unless the authority moved it
    cache.put(ORG, "b", ADMISSION)
    cache.get(ORG, "a")  # a is now the most recently used
    cache.put(ORG, "c", ADMISSION)
    assert len(cache) == 2 and cache.get(ORG, "b") is None and cache.get(ORG, "a") is not None
    clock.now = 11
    assert cache.get(ORG, "a") is None
    cache.put(ORG, "d", ADMISSION)
    cache.forget(ORG, "d")
    assert cache.get(ORG, "d") is None


def test_offline_batch_applies_in_device_time_order_ties_by_upload():
    def scan(minute: int, nonce: str) -> OfflineScan:
        return OfflineScan(event_id=EVENT, ticket_code="T", nonce=nonce, scanned_at=NOW + timedelta(minutes=minute))

    scans = [scan(5, "a"), scan(1, "b"), scan(5, "c"), scan(0, "d")]
    assert [scans[i].nonce for i in offline_apply_order(scans)] == ["d", "b", "a", "c"]


def test_breaker_opens_for_its_cooldown():
    clock = Clock()
    breaker = Breaker(cooldown_seconds=1.0, clock=clock)
    assert breaker.closed
    breaker.failed()
    assert not breaker.closed
    clock.now = 1.0
    assert breaker.closed


async def test_batcher_decides_what_arrived_meanwhile_in_one_call():
    calls: list[int] = []
    gate = asyncio.Event()

    async def decide(org, now, scans):
        calls.append(len(scans))
        if len(calls) == 1:
            await gate.wait()  # the first round trip is slow: the rest queue up
        return [{"i": s["i"], "code": s["code"]} for s in scans]

    batcher = DecisionBatcher(decide)
    first = asyncio.create_task(batcher.submit(ORG, {"code": "0"}))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(ORG, {"code": str(n)})) for n in range(1, 50)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(first, *rest)
    assert [r["code"] for r in results] == [str(n) for n in range(50)]
    assert calls == [1, 49]


async def test_batcher_hands_a_failure_to_every_waiter_and_goes_on():
    fail = True

    async def decide(org, now, scans):
        if fail:
            raise RuntimeError("database down")
        return [{"i": s["i"]} for s in scans]

    batcher = DecisionBatcher(decide)
    outcomes = await asyncio.gather(*(batcher.submit(ORG, {}) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    fail = False
    assert await batcher.submit(ORG, {}) == {"i": 0}


async def test_batcher_keeps_at_most_two_batches_of_a_tenant_under_way():
    calls: list[int] = []
    gate = asyncio.Event()

    async def decide(org, now, scans):
        calls.append(len(scans))
        await gate.wait()
        return [{"i": s["i"], "code": s["code"]} for s in scans]

    async def settle():
        for _ in range(3):
            await asyncio.sleep(0)

    batcher = DecisionBatcher(decide, in_flight=2, parallel_from=8)
    tasks = [asyncio.create_task(batcher.submit(ORG, {"code": "0"}))]
    await settle()
    tasks += [asyncio.create_task(batcher.submit(ORG, {"code": str(n)})) for n in range(1, 8)]
    await settle()
    assert calls == [1], "seven waiting are no backlog yet: they wait for the running batch"
    tasks += [asyncio.create_task(batcher.submit(ORG, {"code": str(n)})) for n in range(8, 30)]
    await settle()
    assert calls == [1, 29], "a backlog: a second batch beside the first"
    tasks += [asyncio.create_task(batcher.submit(ORG, {"code": str(n)})) for n in range(30, 40)]
    await settle()
    assert calls == [1, 29], "never more than two under way"
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [r["code"] for r in results] == [str(n) for n in range(40)]
    assert calls == [1, 29, 10]


async def test_the_scan_batcher_takes_a_backlog_in_up_to_three_batches():
    under_way = 0
    most = 0
    gate = asyncio.Event()

    async def decide(org, now, scans):
        nonlocal under_way, most
        under_way += 1
        most = max(most, under_way)
        await gate.wait()
        under_way -= 1
        return [{"i": s["i"]} for s in scans]

    batcher = DecisionBatcher(decide)  # as the service makes it
    tasks = []
    for burst in range(4):  # each burst a backlog (8 or more waiting) while the others wait
        tasks += [asyncio.create_task(batcher.submit(ORG, {"code": f"{burst}-{n}"})) for n in range(10)]
        for _ in range(3):
            await asyncio.sleep(0)
    assert most == 3
    gate.set()
    assert len(await asyncio.gather(*tasks)) == 40


async def test_tier2_writes_after_the_decision_and_a_failure_is_only_logged():
    from structlog.testing import capture_logs

    from services.scanning.handlers import AccessControl

    written: list[tuple] = []
    release = asyncio.Event()

    class Claims:
        async def claim(self, fresh, moved):
            await release.wait()
            written.append((fresh, moved))
            raise RuntimeError("unexpected reply")

    access = AccessControl(store=None, claims=Claims())  # type: ignore[arg-type]
    item = {"event_id": str(uuid.uuid4()), "code": "TKT-1", "dir": "entry", "device": "gate-1", "nonce": "n1"}
    decision = {"result": "accepted", "reentry": False, "replayed": False, "swap": False,
                "ticket_type": "GA", "first_at": datetime.now(UTC).isoformat(), "first_gate": "A"}
    with capture_logs() as logs:
        access._remember([(ORG, item, decision)])
        # tier 1 knows the admission at once; tier 2 has not been written yet
        assert access.cache.get(ORG, "TKT-1") is not None
        assert written == []
        release.set()
        await access.drain()
    assert len(written) == 1 and written[0][0][0][1] == "TKT-1"
    assert any(e["event"] == "admission_claims_failed" for e in logs)


async def test_batcher_never_leaves_a_scan_without_an_answer_when_a_decision_is_missing():
    async def decide(org, now, scans):
        return [{"i": s["i"]} for s in scans[1:]]  # (a bug) the first scan's decision is missing

    batcher = DecisionBatcher(decide)
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(ORG, {}) for _ in range(3)), return_exceptions=True), 2.0
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes


async def test_tier2_admissions_decided_during_a_write_go_together_in_the_next():
    from services.scanning.handlers import AccessControl

    writes: list[list[str]] = []
    release = asyncio.Event()

    class Claims:
        async def claim(self, fresh, moved):
            writes.append([code for _, code, _ in fresh] + [code for _, code, _ in moved])
            await release.wait()

    access = AccessControl(store=None, claims=Claims())  # type: ignore[arg-type]
    event_id = str(uuid.uuid4())

    def batch(code: str, swap: bool = False) -> None:
        item = {"event_id": event_id, "code": code, "dir": "entry", "device": "gate-1", "nonce": code}
        access._remember([(ORG, item, {
            "result": "accepted", "reentry": False, "replayed": False, "swap": swap,
            "ticket_type": "GA", "first_at": datetime.now(UTC).isoformat(), "first_gate": "A"})])

    batch("TKT-1")
    async with asyncio.timeout(1):
        while not writes:  # the first write is under way (after its linger)
            await asyncio.sleep(0.001)
    batch("TKT-2")
    batch("TKT-3", swap=True)
    assert writes == [["TKT-1"]]
    release.set()
    await access.drain()
    assert writes == [["TKT-1"], ["TKT-2", "TKT-3"]]


async def test_tier2_reads_of_scans_arriving_together_are_one_read_used_by_the_next_batch():
    """Scans arriving within the linger are read from Redis together (one MGET, not one per
    scan), while the batch under way is decided, and what was found (a duplicate) goes to the
    authority as one in the next batch."""
    from libs.actor import Actor, ActorType
    from libs.context import CommandContext
    from libs.contracts.scanning import ScanTicket
    from services.scanning.handlers import AccessControl

    first_batch = asyncio.Event()
    batches: list[list[dict]] = []
    looked_up: list[list[str]] = []

    class Store:
        async def decide(self, org, now, scans):
            batches.append([dict(s) for s in scans])
            if len(batches) == 1:
                await first_batch.wait()
            return [{"i": s["i"], "scan_id": uuid.uuid4(), "result": "rejected", "reason": "already_admitted",
                     "ticket_type": "GA", "first_at": None, "first_gate": None, "conflict": False,
                     "replayed": False, "reentry": False, "swap": False} for s in scans]

    class Claims:
        async def admissions(self, keys):
            looked_up.append([code for _, code in keys])
            return [ADMISSION if code == "TKT-2" else None for _, code in keys]

        async def claim(self, fresh, moved):
            pass

    # (a linger far longer than the steps below take, so the test does not depend on timing)
    access = AccessControl(store=Store(), claims=Claims(), tier2_linger=0.3)  # type: ignore[arg-type]
    ctx = CommandContext(
        actor=Actor(user_id="device-9", organization_id=ORG, role=None, type=ActorType.DEVICE),
        org_id=ORG, subject="vge.cmd.scanning.scan", expires_at=datetime.now(UTC) + timedelta(seconds=30),
        correlation_id="c")
    def scan(code: str) -> asyncio.Task:
        return asyncio.create_task(access.scan(ctx, ScanTicket(event_id=EVENT, ticket_code=code, nonce=code)))

    async def until(condition) -> None:
        async with asyncio.timeout(2):
            while not condition():
                await asyncio.sleep(0.001)

    scans = [scan("TKT-1")]
    await until(lambda: batches)
    scans.append(scan("TKT-2"))
    await until(lambda: looked_up)
    # one read for both, while the first batch (TKT-1 alone) is still under way
    assert [[s["code"] for s in b] for b in batches] == [["TKT-1"]]
    assert looked_up == [["TKT-1", "TKT-2"]]
    first_batch.set()
    await asyncio.gather(*scans)
    second = batches[1]
    assert [s["code"] for s in second] == ["TKT-2"]
    assert second[0]["pre"] == "already_admitted" and second[0]["pre_first_gate"] == "North"
    await access.drain()


def test_tier1_entries_leave_the_garbage_collectors_lists():
    """Cached admissions live for minutes: entries the collector keeps tracking are walked by
    every young collection they are in, with the event loop stopped."""
    import gc

    cache = AdmissionCache()
    for n in range(100):
        cache.put(uuid.uuid4(), f"TKT-{n}", Admission(uuid.uuid4(), "GA", NOW, "North", "device-1", f"n{n}"))
    gc.collect()
    entries = list(cache._entries.items())
    assert len(entries) == 100
    assert not any(gc.is_tracked(key) or gc.is_tracked(value) for key, value in entries)
    # and what comes back out is the admission that went in
    org, code = uuid.uuid4(), "TKT-X"
    cache.put(org, code, ADMISSION)
    assert cache.get(org, code) == ADMISSION and isinstance(cache.get(org, code).event_id, uuid.UUID)


class PartsAuthority:
    """Stands in for the authority's round trip (``ScanningStore._decide``): records each part,
    how many were under way at once, and fails the call numbered ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.parts: list[list[str]] = []
        self.under_way = self.most_at_once = 0
        self.fail_at = fail_at

    async def __call__(self, org, now, part):
        self.parts.append([(s["code"], s["i"]) for s in part])
        call = len(self.parts)
        self.under_way += 1
        self.most_at_once = max(self.most_at_once, self.under_way)
        try:
            if call == self.fail_at:  # (at once: the part beside it is still under way)
                raise RuntimeError("database down")
            await asyncio.sleep(0.001)
            return [{"i": s["i"], "code": s["code"]} for s in part]
        finally:
            self.under_way -= 1


def _upload(n: int, tickets: int) -> list[dict]:
    # n scans of `tickets` tickets, each ticket's scans in the order they are to be applied
    return [{"i": i, "code": f"TKT-{i % tickets}"} for i in range(n)]


def _store(authority: PartsAuthority):
    from services.scanning.adapters.postgres import ScanningStore

    store = ScanningStore(pool=None)  # type: ignore[arg-type]
    store._decide = authority  # type: ignore[method-assign]
    return store


async def test_an_upload_is_decided_in_parts_that_keep_a_tickets_scans_together_and_in_order():
    from services.scanning.adapters.postgres import UPLOAD_PART

    authority = PartsAuthority()
    scans = _upload(5 * UPLOAD_PART, tickets=700)
    handed: list[list[dict]] = []
    await _store(authority).decide_upload(ORG, NOW, scans, lambda part, decisions: handed.append(decisions))

    assert len(authority.parts) >= 5 and authority.most_at_once == 2  # two parts at a time, idle gates
    owner: dict[str, int] = {}
    for n, part in enumerate(authority.parts):
        for code, _ in part:
            assert owner.setdefault(code, n) == n, f"{code} in two parts"
        for code in {code for code, _ in part}:  # a ticket's scans in the upload's (apply) order
            mine = [i for c, i in part if c == code]
            assert mine == [s["i"] for s in scans if s["code"] == code]
    assert sorted(d["i"] for decisions in handed for d in decisions) == list(range(len(scans)))


async def test_an_upload_gives_way_to_the_gates_one_part_at_a_time():
    from services.scanning.adapters.postgres import UPLOAD_PART

    authority = PartsAuthority()
    store = _store(authority)
    store._online_in_flight = 1  # a gate's batch is being decided
    await store.decide_upload(ORG, NOW, _upload(4 * UPLOAD_PART, tickets=900), lambda part, decisions: None)
    assert len(authority.parts) >= 4 and authority.most_at_once == 1


async def test_an_upload_goes_one_part_at_a_time_from_the_first_gate_batch_it_sees():
    from services.scanning.adapters.postgres import UPLOAD_PART

    gate_done = asyncio.Event()
    upload_parts = 0  # upload parts under way now
    after_gate: list[int] = []  # upload parts under way as each started after the gate's batch

    class Authority(PartsAuthority):
        async def __call__(self, org, now, part):
            nonlocal upload_parts
            if part[0]["code"] == "GATE":  # the gate's batch: under way until released
                await gate_done.wait()
                return [{"i": 0, "code": "GATE"}]
            upload_parts += 1
            if gate_started.is_set():
                after_gate.append(upload_parts)
            try:
                return await super().__call__(org, now, part)
            finally:
                upload_parts -= 1

    authority = Authority()
    store = _store(authority)
    gate_started = asyncio.Event()
    upload = asyncio.create_task(store.decide_upload(ORG, NOW, _upload(12 * UPLOAD_PART, tickets=3_000),
                                                     lambda part, decisions: None))
    while len(authority.parts) < 3:  # two at a time so far
        await asyncio.sleep(0)
    assert authority.most_at_once == 2
    gate = asyncio.create_task(store.decide(ORG, NOW, [{"i": 0, "code": "GATE"}]))
    await asyncio.sleep(0)  # (the gate's batch is under way)
    gate_started.set()
    await upload
    gate_done.set()
    assert (await gate) == [{"i": 0, "code": "GATE"}]
    # every part still decided; from the gate's batch on, one at a time (the second lane's part
    # under way when it came may still run beside the first one or two)
    assert sorted(i for part in authority.parts for _, i in part) == list(range(12 * UPLOAD_PART))
    assert len(after_gate) >= 5 and set(after_gate[2:]) == {1}, after_gate


async def test_a_failed_part_fails_the_upload_and_no_further_part_starts():
    from services.scanning.adapters.postgres import UPLOAD_PART

    authority = PartsAuthority(fail_at=2)
    handed: list[list[dict]] = []
    with pytest.raises(RuntimeError, match="database down"):
        await _store(authority).decide_upload(ORG, NOW, _upload(8 * UPLOAD_PART, tickets=2_000),
                                              lambda part, decisions: handed.append(decisions))
    # the part under way beside the failed one ended (and was handed over, it committed) before
    # the failure was raised; none starts after the failure
    assert len(authority.parts) <= 3 < 8
    assert len(handed) == len(authority.parts) - 1


async def test_an_uploads_tier2_claims_are_written_once_its_parts_are_decided():
    """An upload's admissions go to tier 1 as each part is decided, and to Redis after the last
    part, in the background: 10,000 claims written beside the parts took the event loop from
    them."""
    from libs.actor import Actor, ActorType
    from libs.context import CommandContext
    from libs.contracts.scanning import SyncOfflineScans
    from services.scanning.handlers import AccessControl

    parts_decided = 0
    writes: list[tuple[int, list[str]]] = []  # (parts decided by then, codes written)

    class Store:
        async def decide_upload(self, org, now, items, decided):
            nonlocal parts_decided
            for part in (items[:2], items[2:]):
                await asyncio.sleep(0.05)  # each part a round trip, far longer than the linger
                decided(part, [{"i": s["i"], "scan_id": uuid.uuid4(), "result": "accepted", "reason": None,
                                "ticket_type": "GA", "first_at": s["scanned_at"], "first_gate": s["gate"],
                                "conflict": False, "replayed": False, "reentry": False, "swap": False}
                               for s in part])
                parts_decided += 1

    class Claims:
        async def claim(self, fresh, moved):
            writes.append((parts_decided, sorted(code for _, code, _ in [*fresh, *moved])))

    access = AccessControl(store=Store(), claims=Claims(), tier2_linger=0.001)  # type: ignore[arg-type]
    ctx = CommandContext(
        actor=Actor(user_id="device-9", organization_id=ORG, role=None, type=ActorType.DEVICE),
        org_id=ORG, subject="vge.cmd.scanning.sync", expires_at=datetime.now(UTC) + timedelta(seconds=30),
        correlation_id="c")
    upload = SyncOfflineScans(scans=[
        OfflineScan(event_id=EVENT, ticket_code=f"TKT-{n}", gate="East", nonce=f"n{n}",
                    scanned_at=NOW + timedelta(seconds=n)) for n in range(4)])
    synced = await access.sync(ctx, upload)
    assert [r.result for r in synced.results] == ["accepted"] * 4
    assert all(access.cache.get(ORG, f"TKT-{n}") is not None for n in range(4))  # tier 1 at once
    await access.drain()
    assert writes == [(2, ["TKT-0", "TKT-1", "TKT-2", "TKT-3"])]  # one write, after both parts
