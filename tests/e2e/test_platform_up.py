"""`vge up` (the README's run command) brings up the servers and four healthy services, and
Ctrl-C stops every process it started."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest

from libs.servers import free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _nats_admits_only_its_users(url: str, passwords_file: Path) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    admin_password = json.loads(passwords_file.read_text())["admin"]
    nc = await nats.connect(url, user="admin", password=admin_password, allow_reconnect=False)
    await nc.close()


def test_vge_up_starts_everything_and_stops_cleanly(tmp_path: Path):
    data_dir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    env.update(VGE_GATEWAY_PORT=str(free_port()), VGE_LOG_FORMAT="json")
    vge = Path(sys.executable).parent / "vge"
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(vge), "up", "--data-dir", str(data_dir)], env=env,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "vge.log", "wb"),
    )
    stack_file = data_dir / "stack.json"
    try:
        while not stack_file.exists():
            assert proc.poll() is None, (tmp_path / "vge.log").read_text()[-3000:]
            assert time.monotonic() - started < 60, "platform not up within 60 s"
            time.sleep(0.2)
        stack = json.loads(stack_file.read_text())
        for name, url in stack["health"].items():
            body = httpx.get(url, timeout=2).json()
            assert body == {**body, "service": name, "status": "ok"}
            assert body["checks"]["nats"] is True and body["checks"]["postgres"] is True
            assert body["checks"].get("redis", True) is True  # payments keeps nothing in Redis
            spec = httpx.get(url.replace("/healthz", "/asyncapi.json"), timeout=5).json()
            assert spec["asyncapi"] == "3.0.0"
            subjects = {c["address"] for c in spec["channels"].values()}
            expected = {
                "scanning": {"vge.cmd.scanning.scan", "vge.cmd.scanning.sync",
                             "vge.evt.{org_id}.scanning.scan.accepted"},
                "payments": {"vge.cmd.payments.complete_checkout",
                             "vge.evt.{org_id}.payments.ticket.issued"},
                "audit": {"vge.cmd.audit.query", "vge.cmd.audit.verify"},
                "gateway": set(),
            }[name]
            assert expected <= subjects, (name, subjects)
        # the services above are healthy on a NATS that admits no one without a login
        passwords_file = Path(stack["nats_passwords_file"])
        assert passwords_file.stat().st_mode & 0o077 == 0
        asyncio.run(_nats_admits_only_its_users(stack["nats_url"], passwords_file))
        metrics = httpx.get(stack["gateway_url"] + "/metrics", timeout=2)
        assert metrics.status_code == 200 and "python_info" in metrics.text
        # the process watches its event loop (a timer every 20 ms, each one observed)
        lag = [line for line in metrics.text.splitlines() if line.startswith("vge_event_loop_lag_seconds_count")]
        assert lag and float(lag[0].rpartition(" ")[2]) > 0
        # the demo tenant: a device scans a sold ticket over HTTP (the gateway and the services
        # talking on a NATS that enforces who may publish what)
        demo_file = data_dir / "demo.json"
        while not demo_file.exists():
            assert proc.poll() is None, (tmp_path / "vge.log").read_text()[-3000:]
            assert time.monotonic() - started < 90, "demo not seeded within 90 s"
            time.sleep(0.2)
        time.sleep(0.2)  # written after the file appears
        demo = json.loads(demo_file.read_text())
        api, device = stack["gateway_url"], {"Authorization": f"Bearer {demo['device_token']}"}
        scan = {"event_id": demo["event_id"], "ticket_code": demo["tickets"][0]["ticket_code"]}
        deadline = time.monotonic() + 20
        while (first := httpx.post(f"{api}/v1/scans", json=scan, headers=device, timeout=5).json()
               )["result"] != "accepted":  # the registry learns of the sale from events
            assert first["reason"] == "unknown_ticket" and time.monotonic() < deadline, first
            time.sleep(0.2)
        again = httpx.post(f"{api}/v1/scans", json=scan, headers=device, timeout=5).json()
        assert again["reason"] == "already_admitted" and again["first_gate"] == "A"
        deadline = time.monotonic() + 10
        while "curl" not in (tmp_path / "vge.log").read_text():  # told how to scan
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the operator CLI finds the running stack by itself
        made = subprocess.run([str(vge), "tenant", "create", "Kaapse Klopse", "--data-dir", str(data_dir)],
                              env=env, capture_output=True, timeout=60)
        assert made.returncode == 0, made.stderr.decode()[-2000:]
        new_tenant = json.loads(made.stdout)
        balances = httpx.get(f"{api}/v1/ledger/balances", timeout=5,
                             headers={"Authorization": f"Bearer {new_tenant['api_key']}"})
        assert balances.status_code == 200 and balances.json() == {"accounts": []}
        org = demo["organization_id"]
        deadline = time.monotonic() + 20
        while True:  # the demo's sale and scans reach its audit chain, which verifies intact
            verify = subprocess.run([str(vge), "audit", "verify", org, "--data-dir", str(data_dir)],
                                    env=env, capture_output=True, timeout=60)
            assert verify.returncode == 0, verify.stderr.decode()[-2000:]
            report = json.loads(verify.stdout)
            assert report["ok"] is True
            if report["records_checked"] >= 10:
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.5)
        pids = list(stack["pids"].values()) + stack["server_pids"]
        assert len(stack["server_pids"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=45) == 0, (tmp_path / "vge.log").read_text()[-3000:]
    log = (tmp_path / "vge.log").read_text()
    for name in ("scanning", "payments", "audit", "gateway"):
        assert f'"service": "{name}"' in log and "service_stopped" in log
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if _alive(p)] == []
    assert not stack_file.exists()


def test_a_service_stops_cleanly_on_sigterm(tmp_path: Path, server_urls, context_keys):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    port = free_port()
    env.update(
        VGE_NATS_URL=server_urls["nats_url"], VGE_DATABASE_URL=server_urls["database_url"],
        VGE_REDIS_URL=server_urls["redis_url"], VGE_CONTEXT_PUBLIC_KEYS=context_keys[1],
        VGE_HEALTH_PORT=str(port), VGE_LOG_FORMAT="json",
    )
    proc = subprocess.Popen([sys.executable, "-m", "services.scanning"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    lines = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "service_started" in events and events[-1] == "service_stopped"


def test_a_service_without_configuration_says_what_is_missing(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VGE_")}
    proc = subprocess.run([sys.executable, "-m", "services.audit"], env=env, capture_output=True,
                          timeout=30)
    assert proc.returncode != 0
    assert b"VGE_NATS_URL" in proc.stderr and b"vge up" in proc.stderr
