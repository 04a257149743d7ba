"""Scanning: ticket registry, scans with three-tier dedup, entry/exit, occupancy, offline sync
(design §5).

The one place that wires this service: real adapters for a running process. Commands are
registered on ``runtime.router``, the registry consumer with ``runtime.add_consumer``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from libs.contracts.scanning import (
    GetOccupancy,
    Occupancy,
    OccupancyChanged,
    ScanAccepted,
    ScanRejected,
    OfflineScansSynced,
    ScanDecision,
    ScanTicket,
    SyncOfflineScans,
)
from libs.background import cancel_and_wait
from libs.log import get_logger
from libs.runtime import ServiceRuntime, configure_service_logging, run_service
from libs.settings import Settings, get_settings
from services.scanning.adapters.postgres import OCCUPANCY_LIMIT, ScanningStore
from services.scanning.adapters.redis_claims import AdmissionClaims
from services.scanning.handlers import REGISTRY_CONSUMER, AccessControl

SERVICE = "scanning"
MIGRATIONS = Path(__file__).parent / "migrations"
# A dashboard sees the latest value within ~100 ms (the scanning issue, #3): a change waits up to
# a tick to be queued, and the relay publishes it at once (``publish_occupancy_changes``).
# bench/bench_scan.py at 1,000 scans/s, an admission's count in occupancy.changed after its
# answer: at 100 ms, with the relay's next turn (up to 50 ms later), p50 78-79 ms, p99 142-146 ms;
# at 50 ms and at once, p50 30-33 ms, p99 57-92 ms (2 runs each). The cost: 20 calls a second
# while scans are admitted, against 10; at 1,000 scans/s the batches make ~300.
OCCUPANCY_TICK_SECONDS = 0.05
# PostgreSQL is also asked this often with nothing admitted here: for changes another replica
# made and did not publish (it crashed between its commit and its next tick)
OCCUPANCY_SWEEP_SECONDS = 2.0

log = get_logger(__name__)


def build(settings: Settings) -> ServiceRuntime:
    """The scanning service's runtime with its commands and consumers registered."""
    runtime = ServiceRuntime(SERVICE, settings, migrations_dir=MIGRATIONS)

    def access() -> AccessControl:
        return runtime.components["access"]

    async def wire() -> None:
        assert runtime.pool is not None
        runtime.components["access"] = AccessControl(ScanningStore(runtime.pool), AdmissionClaims(runtime.redis))
        runtime.components["occupancy_ticker"] = asyncio.create_task(
            _publish_occupancy(access().store)
        )

    async def unwire() -> None:
        await access().drain()
        await cancel_and_wait(runtime.components["occupancy_ticker"])

    runtime.publishes(ScanAccepted, ScanRejected, OccupancyChanged)
    runtime.on_start(wire)
    runtime.on_stop(unwire)

    @runtime.router.command("scan", ScanTicket, ScanDecision)
    async def scan(ctx, cmd: ScanTicket) -> ScanDecision:
        """Decide one scan at a gate (entry or exit)."""
        return await access().scan(ctx, cmd)

    @runtime.router.command("sync", SyncOfflineScans, OfflineScansSynced)
    async def sync(ctx, cmd: SyncOfflineScans) -> OfflineScansSynced:
        """Upload scans a device decided offline."""
        return await access().sync(ctx, cmd)

    @runtime.router.command("occupancy", GetOccupancy, Occupancy)
    async def occupancy(ctx, cmd: GetOccupancy) -> Occupancy:
        """The current occupancy of an event."""
        return await access().occupancy(ctx, cmd)

    async def registry(envelope) -> None:
        await access().apply_catalog_event(envelope)

    async def registry_batch(envelopes) -> None:
        await access().apply_catalog_events(envelopes)

    # batches: a sale of thousands of tickets is thousands of events; a failing batch is
    # retried event by event, so one poison event is dead-lettered alone
    runtime.add_consumer(
        REGISTRY_CONSUMER, registry, batch_handler=registry_batch, batch=500,
        filter_subject="vge.evt.*.payments.>",
    )
    return runtime


async def _publish_occupancy(store: ScanningStore) -> None:
    """Queue the coalesced ``occupancy.changed`` events: at most one call per tick (from one
    call's start to the next's), and only when this replica admitted or let someone out since
    the last one (each replica publishes its own changes), or every ``OCCUPANCY_SWEEP_SECONDS``
    for what another left behind. An idle service asked PostgreSQL 10 times a second before."""
    changed = store.occupancy_changed
    loop = asyncio.get_running_loop()
    while True:
        try:
            await asyncio.wait_for(changed.wait(), OCCUPANCY_SWEEP_SECONDS)
        except TimeoutError:
            pass  # the sweep
        began = loop.time()
        changed.clear()  # (before the call: a change committed during it wakes the next one)
        try:
            if await store.publish_occupancy_changes(OCCUPANCY_LIMIT) >= OCCUPANCY_LIMIT:
                changed.set()  # more events changed than one call takes
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - PostgreSQL blip: try again next tick
            log.warning("occupancy_publish_failed", error=repr(exc))
            changed.set()
        # a tick from the call's start, not its end: a call slowed by load (10-20 ms flat out)
        # made every change wait that much longer to be published (bench_scan.py flat out, 2
        # pairs: dashboards' p99 106-111 against 111-116 ms, 146-148 events against 132-133)
        await asyncio.sleep(max(0.0, began + OCCUPANCY_TICK_SECONDS - loop.time()))


def main() -> None:
    """Entry point of ``python -m services.scanning``."""
    settings = get_settings()
    configure_service_logging(SERVICE, settings)
    run_service(build(settings))
