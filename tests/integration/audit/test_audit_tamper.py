"""Tampering with the audit log: the service's own login cannot; an administrator's raw SQL can,
and verification (command and CLI) names exactly the record that was touched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace

import asyncpg
import pytest

from libs.db import service_dsn
from services.audit.adapters.postgres import _COLUMNS, _record
from services.audit.bootstrap import build
from services.audit.domain import record_hash


async def _chain_of(bench, n: int) -> uuid.UUID:
    org = uuid.uuid4()
    await bench.publish([bench.sample_event(org, i) for i in range(n)])
    await bench.wait_for_records(org, n)
    assert (await bench.verify(org))["ok"] is True
    return org


async def _event_at(bench, org: uuid.UUID, seq: int) -> str:
    return str(await bench.db.fetchval(
        "SELECT event_id FROM audit.records WHERE organization_id = $1 AND seq = $2", org, seq
    ))


async def test_an_edited_record_is_reported(start_service, bench):
    await start_service(build)
    org = await _chain_of(bench, 8)
    edited = await _event_at(bench, org, 4)
    status = await bench.db.execute(
        """UPDATE audit.records SET change = '{"n": 999}' WHERE organization_id = $1 AND seq = 4""", org
    )
    assert status == "UPDATE 1"

    result = await bench.verify(org)
    assert result["ok"] is False and result["records_checked"] == 3 and result["last_seq"] == 8
    assert result["problem"] == {
        "seq": 4, "kind": "tampered", "event_id": edited, "detail": result["problem"]["detail"],
    }


async def test_an_edited_and_rehashed_record_is_reported(start_service, bench):
    await start_service(build)
    org = await _chain_of(bench, 8)
    row = await bench.db.fetchrow(
        f"SELECT {_COLUMNS} FROM audit.records WHERE organization_id = $1 AND seq = 6", org
    )
    record = _record(row)
    # what a careful forger does: change the actor, then recompute the record's own hash
    entry = replace(
        record.entry,
        actor={**record.entry.actor, "user_id": "somebody-else"},
        change=json.loads(record.entry.change),  # the admin pool has no json codec: text
    )
    forged = record_hash(entry, record.seq, record.recorded_at, record.prev_hash)
    await bench.db.execute(
        "UPDATE audit.records SET actor_user_id = 'somebody-else', hash = $2 "
        "WHERE organization_id = $1 AND seq = 6", org, forged,
    )
    result = await bench.verify(org)
    assert result["ok"] is False
    assert (result["problem"]["seq"], result["problem"]["kind"]) == (6, "broken_link")
    assert result["problem"]["event_id"] == str(record.entry.event_id)


async def test_a_deleted_record_is_reported(start_service, bench):
    await start_service(build)
    org = await _chain_of(bench, 8)
    assert await bench.db.execute(
        "DELETE FROM audit.records WHERE organization_id = $1 AND seq = 5", org
    ) == "DELETE 1"
    result = await bench.verify(org)
    assert result["ok"] is False and result["records_checked"] == 4
    assert (result["problem"]["seq"], result["problem"]["kind"]) == (5, "missing")

    tail = await _chain_of(bench, 5)
    await bench.db.execute("DELETE FROM audit.records WHERE organization_id = $1 AND seq = 5", tail)
    result = await bench.verify(tail)
    assert (result["ok"], result["problem"]["seq"], result["problem"]["kind"]) == (False, 5, "missing")


async def test_the_service_login_can_append_but_never_change_or_remove(
    start_service, bench, admin_dsn, platform_settings
):
    await start_service(build)
    org = await _chain_of(bench, 3)
    conn = await asyncpg.connect(service_dsn(admin_dsn, "audit", platform_settings.db_role_password))
    try:
        for sql in (
            "UPDATE audit.records SET change = '{}'",
            "DELETE FROM audit.records",
            "TRUNCATE audit.records",
            "DELETE FROM audit.chain_heads",
        ):
            async with conn.transaction():
                await conn.execute("SELECT set_config('vge.org_id', $1, true)", str(org))
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
    finally:
        await conn.close()
    assert (await bench.verify(org))["ok"] is True


def _cli(args: list[str], server_urls: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    env["VGE_DATABASE_URL"] = server_urls["database_url"]
    return subprocess.run(
        [sys.executable, "-m", "services.audit.cli", *args], env=env, capture_output=True,
        text=True, timeout=60,
    )


async def test_cli_verify_prints_json_and_exits_1_when_broken(start_service, bench, server_urls):
    await start_service(build)
    intact = await _chain_of(bench, 4)
    broken = await _chain_of(bench, 4)
    await bench.db.execute(
        "UPDATE audit.records SET correlation_id = 'forged' WHERE organization_id = $1 AND seq = 2", broken
    )
    ok, bad, nonsense = await asyncio.gather(
        asyncio.to_thread(_cli, ["verify", str(intact)], server_urls),
        asyncio.to_thread(_cli, ["verify", str(broken)], server_urls),
        asyncio.to_thread(_cli, ["verify", "not-a-uuid"], server_urls),
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {
        "organization_id": str(intact), "ok": True, "records_checked": 4, "last_seq": 4, "problem": None,
    }
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert (report["ok"], report["problem"]["seq"], report["problem"]["kind"]) == (False, 2, "tampered")
    assert nonsense.returncode == 2 and "not an organization id" in nonsense.stderr
