"""A payments process killed with SIGKILL in the middle of a checkout saga, then restarted:
the saga completes (or refunds), and the processor's charges minus refunds equal the ledger's
processor receivable.

The crash is made deterministic with the test-only ``VGE_PAYMENTS_CRASH_AFTER=<step>``: the
process SIGKILLs itself right after that saga step has committed (see
``services/payments/adapters/faults.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from libs.actor import Actor, ActorType, Role
from libs.errors import Unavailable
from libs.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
PRICE = 20_000


class PaymentsProcess:
    """``python -m services.payments`` as a child process."""

    def __init__(self, server_urls, public_key: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        child_env = {
            **os.environ,
            "VGE_NATS_URL": server_urls["nats_url"],
            "VGE_DATABASE_URL": server_urls["database_url"],
            "VGE_REDIS_URL": server_urls["redis_url"],
            "VGE_CONTEXT_PUBLIC_KEYS": public_key,
            "VGE_HEALTH_PORT": str(self.port),
            "VGE_ENVIRONMENT": "test",
            "VGE_LOG_FORMAT": "json",
            "VGE_HOLD_SWEEP_INTERVAL_SECONDS": "0.2",
            **env,
        }
        if "VGE_PAYMENTS_CRASH_AFTER" not in env:  # never inherit the crash switch
            child_env.pop("VGE_PAYMENTS_CRASH_AFTER", None)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.payments"], cwd=ROOT, env=child_env,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    async def healthy(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with httpx.AsyncClient() as http:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"payments exited ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    if (await http.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"payments not healthy in time:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    async def exited(self, timeout: float = 15.0) -> int:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("payments did not exit")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
async def db(admin_dsn):
    conn = await asyncpg.connect(admin_dsn, server_settings={"search_path": "payments,vge"})
    yield conn
    await conn.close()


@pytest.mark.parametrize(("crash_after", "status_at_crash"), [("charge", "charged"), ("post", "posted")])
async def test_killed_mid_saga_then_restarted_completes_and_the_money_reconciles(
        server_urls, context_keys, commands, db, tmp_path, crash_after, status_at_crash):
    org = uuid.uuid4()
    call = _owner_commands(commands, org)

    first = PaymentsProcess(server_urls, context_keys[1], tmp_path / "payments.log",
                            VGE_PAYMENTS_CRASH_AFTER=crash_after)
    second = None
    try:
        await first.healthy()
        event, checkout, complete = await _sale_to_complete(call, "crash-key")
        with pytest.raises(Unavailable):  # the process dies before it can answer
            await call("complete_checkout", complete, timeout=3)
        assert await first.exited() == -signal.SIGKILL

        checkout_id = uuid.UUID(checkout["checkout_id"])
        assert await db.fetchval("SELECT status FROM checkouts WHERE id = $1", checkout_id) == status_at_crash
        assert await db.fetchval("SELECT count(*) FROM tickets WHERE checkout_id = $1", checkout_id) == 0
        assert await db.fetchval("SELECT count(*) FROM fake_processor_charges "
                                 "WHERE organization_id = $1", org) == 1

        # restart without the crash switch: startup resumes the saga before serving commands
        second = PaymentsProcess(server_urls, context_keys[1], tmp_path / "payments.log")
        await second.healthy()
        view = await call("get_checkout", {"checkout_id": checkout["checkout_id"]})
        assert view["status"] == "completed" and len(view["tickets"]) == 2

        # the client's retry gets the tickets, and nothing is charged again
        retried = await call("complete_checkout", complete)
        assert retried["status"] == "completed"
        assert sorted(t["ticket_code"] for t in retried["tickets"]) == sorted(
            t["ticket_code"] for t in view["tickets"])

        await _charged_once_and_booked_once(db, call, org)
        assert await db.fetchval("SELECT reserved FROM ticket_types WHERE event_id = $1",
                                 uuid.UUID(event["event_id"])) == 2
        assert await db.fetchval("SELECT count(*) FROM holds WHERE checkout_id = $1 "
                                 "AND state = 'consumed'", checkout_id) == 1
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_killed_after_the_charge_before_anything_was_recorded_the_restart_completes_once(
        server_urls, context_keys, commands, db, tmp_path, platform_settings):
    """The saga's own path: after the charge, recording it, booking the sale, issuing the
    tickets and queueing the events are ONE transaction. A kill between the processor's answer
    and that commit leaves the checkout in 'charging' with the money at the processor. Made
    here by killing the process right after 'charging' committed and then letting the charge
    land at the processor (the request was on the wire): the restart finds the charge by its
    key and completes the sale, exactly once."""
    from services.payments.adapters.processor import FakeProcessor
    from services.payments.domain.money import Money
    from services.payments.saga import _processor_key
    from libs.db import service_dsn

    org = uuid.uuid4()
    call = _owner_commands(commands, org)

    first = PaymentsProcess(server_urls, context_keys[1], tmp_path / "payments.log",
                            VGE_PAYMENTS_CRASH_AFTER="charging")
    second = None
    fake = FakeProcessor()
    try:
        await first.healthy()
        event, checkout, complete = await _sale_to_complete(call, "crash-key-taken")
        with pytest.raises(Unavailable):
            await call("complete_checkout", complete, timeout=3)
        assert await first.exited() == -signal.SIGKILL
        checkout_id = uuid.UUID(checkout["checkout_id"])
        assert await db.fetchval("SELECT status FROM checkouts WHERE id = $1", checkout_id) == "charging"

        # the charge that was in flight when the process died reaches the processor
        await fake.open(service_dsn(server_urls["database_url"], "payments",
                                    platform_settings.db_role_password))
        await fake.charge(org, _processor_key(checkout_id), Money(2 * PRICE, "ZAR"), "tok_ok")
        assert await db.fetchval("SELECT count(*) FROM tickets WHERE checkout_id = $1", checkout_id) == 0
        assert await db.fetchval("SELECT count(*) FROM journal_entries WHERE organization_id = $1", org) == 0

        second = PaymentsProcess(server_urls, context_keys[1], tmp_path / "payments.log")
        await second.healthy()
        view = await call("get_checkout", {"checkout_id": checkout["checkout_id"]})
        assert view["status"] == "completed" and len(view["tickets"]) == 2
        retried = await call("complete_checkout", complete)
        assert retried["status"] == "completed"
        assert sorted(t["ticket_code"] for t in retried["tickets"]) == sorted(
            t["ticket_code"] for t in view["tickets"])

        await _charged_once_and_booked_once(db, call, org)
        assert await db.fetchval("SELECT charge_id FROM checkouts WHERE id = $1", checkout_id) is not None
        assert await db.fetchval("SELECT reserved FROM ticket_types WHERE event_id = $1",
                                 uuid.UUID(event["event_id"])) == 2
        assert await db.fetchval("SELECT count(*) FROM holds WHERE checkout_id = $1 "
                                 "AND state = 'consumed'", checkout_id) == 1
        assert await db.fetchval("SELECT count(*) FROM outbox WHERE organization_id = $1 "
                                 "AND subject LIKE '%ticket.issued'", org) == 2
    finally:
        await fake.close()
        first.stop()
        if second is not None:
            second.stop()


async def _charged_once_and_booked_once(db, call, org) -> None:
    """One charge, in the ledger once: charges minus refunds equal the receivable, the trial
    balance is zero and there is exactly one journal entry."""
    charged, refunded, charges = await db.fetchrow(
        "SELECT coalesce(sum(c.amount), 0), coalesce(sum(r.amount), 0), count(c.id) "
        "FROM fake_processor_charges c LEFT JOIN fake_processor_refunds r "
        "ON r.organization_id = c.organization_id AND r.charge_id = c.id "
        "WHERE c.organization_id = $1", org)
    balances = {a["account"]: a for a in (await call("ledger_balances", {}))["accounts"]}
    assert charges == 1
    assert charged - refunded == balances["processor_receivable"]["balance"] == 2 * PRICE
    assert sum(a["balance"] for a in balances.values()) == 0
    assert await db.fetchval("SELECT count(*) FROM journal_entries WHERE organization_id = $1", org) == 1


def _owner_commands(commands, org):
    """``call(name, body)``: a payments command as the tenant's owner."""
    owner = Actor(user_id="owner", organization_id=org, role=Role.OWNER, type=ActorType.USER)

    async def call(name, body, timeout=10.0):
        return await commands.request(f"vge.cmd.payments.{name}", body, actor=owner, org_id=org,
                                      correlation_id=f"crash-{uuid.uuid4().hex[:6]}", timeout=timeout)

    return call


async def _sale_to_complete(call, key):
    """An event with 10 tickets and a pending checkout of 2; the completion command to send."""
    start = datetime.now(UTC) + timedelta(days=3)
    event = await call("create_event", {
        "name": "crash", "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=2)).isoformat(), "capacity": 10,
        "ticket_types": [{"code": "GA", "name": "GA", "price": PRICE, "quantity": 10}]})
    checkout = await call("create_checkout", {
        "event_id": event["event_id"], "customer_email": "c@example.com",
        "items": [{"ticket_type": "GA", "quantity": 2}]})
    complete = {"checkout_id": checkout["checkout_id"], "payment_token": "tok_ok",
                "idempotency_key": key}
    return event, checkout, complete
