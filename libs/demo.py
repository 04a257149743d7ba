"""The demo tenant ``vge up`` seeds (design §8), through the public HTTP API like any client.

A tenant with its owner key, an event with two ticket types, a gate device enrolled for it and
a few sold tickets, so a newcomer can scan with ``curl`` within a minute of ``make up``. Kept in
``<data dir>/demo.json``: a restart of ``vge up`` on the same data reuses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

__all__ = ["seed_demo", "demo_instructions", "DEMO_FILE"]

DEMO_FILE = "demo.json"


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"demo seeding: {response.request.method} {response.request.url.path} "
                           f"answered {response.status_code}: {response.text[:300]}")  # fmt: skip
    return response.json()


def _create_tenant(name: str, database_url: str) -> dict[str, Any]:
    # libs never imports a service: the gateway's own CLI creates the tenant, in its process
    env = {**os.environ, "VGE_DATABASE_URL": database_url, "VGE_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "services.gateway.cli", "tenant-create", name],
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"demo seeding: tenant create failed: {done.stderr.decode()[-500:]}")
    return json.loads(done.stdout)


def seed_demo(data_dir: Path, api_url: str, database_url: str) -> dict[str, Any]:
    """Seed the demo tenant once (or reuse the one in ``demo.json`` if its key still works)."""
    path = data_dir / DEMO_FILE
    with httpx.Client(base_url=api_url, timeout=30) as http:
        if path.exists():
            demo = json.loads(path.read_text())
            alive = http.get("/v1/ledger/balances",
                             headers={"Authorization": f"Bearer {demo['owner_api_key']}"})  # fmt: skip
            if alive.status_code == 200:
                return demo
        tenant = _create_tenant("Voelgoed Demo", database_url)
        owner = {"Authorization": f"Bearer {tenant['api_key']}"}
        now = datetime.now(UTC)
        event = _checked(http.post("/v1/events", headers=owner, json={
            "name": "Voelgoed Demo Fest", "starts_at": now.isoformat(),
            "ends_at": (now + timedelta(days=7)).isoformat(), "capacity": 600,
            "reentry_allowed": True,
            "ticket_types": [
                {"code": "GA", "name": "General admission", "price": 35000, "currency": "ZAR",
                 "quantity": 500},
                {"code": "VIP", "name": "VIP", "price": 95000, "currency": "ZAR", "quantity": 50},
            ]}))  # fmt: skip
        device = _checked(http.post("/v1/devices", headers=owner, json={
            "name": "Gate A scanner", "event_id": event["event_id"], "gate": "A"}))
        enrolled = _checked(http.post("/v1/devices/enrol",
                                      json={"enrolment_token": device["enrolment_token"]}))  # fmt: skip
        checkout = _checked(http.post("/v1/checkouts", headers=owner, json={
            "event_id": event["event_id"], "customer_email": "demo@voelgoed.example",
            "items": [{"ticket_type": "GA", "quantity": 3}, {"ticket_type": "VIP", "quantity": 1}]}))
        sale = _checked(http.post(
            f"/v1/checkouts/{checkout['checkout_id']}/complete", json={"payment_token": "tok_ok"},
            headers={**owner, "Idempotency-Key": str(uuid.uuid4())}))  # fmt: skip
    demo = {
        "organization_id": tenant["organization_id"], "owner_api_key": tenant["api_key"],
        "event_id": event["event_id"], "device_id": enrolled["device_id"],
        "device_token": enrolled["device_token"], "tickets": sale["tickets"],
    }  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds credentials
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(demo, indent=2))
    return demo


def demo_instructions(demo: dict[str, Any], api_url: str) -> str:
    """What ``vge up`` prints: the demo's credentials and how to scan and watch occupancy."""
    code = demo["tickets"][0]["ticket_code"]
    body = json.dumps({"event_id": demo["event_id"], "ticket_code": code, "direction": "entry"})
    codes = "\n".join(f"    {t['ticket_code']}  ({t['ticket_type']})" for t in demo["tickets"])
    return (
        f"Demo tenant {demo['organization_id']}:\n"
        f"  OWNER={demo['owner_api_key']}\n"
        f"  DEVICE={demo['device_token']}\n"
        f"  event {demo['event_id']}, sold tickets:\n{codes}\n"
        "Scan a ticket at the gate (again: already_admitted):\n"
        f"  curl -s {api_url}/v1/scans -H \"Authorization: Bearer $DEVICE\" "
        f"-H 'Content-Type: application/json' -d '{body}'\n"
        "Watch occupancy live (SSE):\n"
        f"  curl -N {api_url}/v1/events/{demo['event_id']}/occupancy/stream "
        "-H \"Authorization: Bearer $OWNER\"\n"
        f"API docs: {api_url}/docs\n"
    )
