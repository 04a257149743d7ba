"""The gateway's edges: rate limits, body limits, bad JSON, a service that does not answer,
and Idempotency-Key replays of the gateway's own mutations."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from libs.servers import NatsServer
from services.gateway.bootstrap import build


@pytest.fixture
async def strict_gateway(start_service, tenant):
    """A second gateway replica with tight limits, on the same servers."""
    runtime = await start_service(build, gateway_port=0, rate_limit_per_second=5,
                                  max_request_bytes=4096)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.http_port}",
                                 headers=tenant.auth()) as http:
        yield http


async def test_rate_limit_per_credential_is_429_with_retry_after(strict_gateway, tenant):
    started = time.time()
    responses = await asyncio.gather(*(strict_gateway.get("/v1/ledger/balances") for _ in range(30)))
    windows = int(time.time()) - int(started) + 1  # one-second windows the burst touched
    codes = [r.status_code for r in responses]
    assert codes.count(429) >= 1 and codes.count(200) >= 1, codes
    assert codes.count(200) <= 5 * windows, (codes, windows)  # at most 5 in each window
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["code"] == "rate_limited" and limited.headers["retry-after"] == "1"
    # another credential of the same tenant has its own budget
    other = (await tenant.post("/v1/api-keys", {"name": "second", "role": "admin"})).json()["api_key"]
    r = await strict_gateway.get("/v1/ledger/balances", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 200


async def test_body_over_the_limit_is_413(strict_gateway):
    big = {"name": "x" * 10_000}
    r = await strict_gateway.post("/v1/devices", json=big)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

    async def chunks():  # no Content-Length: counted as it streams in
        for _ in range(10):
            yield b" " * 1024

    r = await strict_gateway.post("/v1/devices", content=chunks(),
                                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413


async def test_bad_json_is_400_and_a_bad_shape_is_422(tenant):
    r = await tenant.http.post("/v1/checkouts", content=b'{"event_id": ', headers={
        **tenant.auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_input"
    r = await tenant.post("/v1/checkouts", {"event_id": "not-a-uuid", "items": []})
    assert r.status_code == 422 and r.json()["code"] == "invalid_input"
    assert {tuple(e["loc"][-1:]) for e in r.json()["errors"]} >= {("event_id",), ("items",)}
    r = await tenant.post("/v1/scans", {"event_id": "01a232f9-c16b-7419-8ab4-0f6064571a5e",
                                        "ticket_code": "x", "direction": "sideways"})
    assert r.status_code == 422
    r = await tenant.post("/v1/checkouts/not-a-uuid/complete", {"payment_token": "tok_ok"},
                          headers={"Idempotency-Key": "k"})
    assert r.status_code == 422
    r = await tenant.post("/v1/checkouts/01a232f9-c16b-7419-8ab4-0f6064571a5e/complete",
                          {"payment_token": "tok_ok"})  # no Idempotency-Key
    assert r.status_code == 422 and "Idempotency-Key" in str(r.json()["errors"])
    r = await tenant.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_a_service_that_does_not_answer_is_503_never_a_guess(start_service, tenant, tmp_path: Path):
    lonely = NatsServer(tmp_path / "nats").start()  # a bus on which no service listens
    try:
        runtime = await start_service(build, gateway_port=0, nats_url=lonely.url,
                                      command_timeout_seconds=0.5)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.http_port}",
                                     headers=tenant.auth()) as http:
            r = await http.post("/v1/scans", json={"event_id": "01a232f9-c16b-7419-8ab4-0f6064571a5e",
                                                   "ticket_code": "TKT-1"})
            assert r.status_code == 503 and r.json()["code"] == "unavailable"
            assert r.headers["retry-after"] == "1"
            # an Idempotency-Key is not burnt by an unknown outcome: the retry does the work
            body = {"event_id": "01a232f9-c16b-7419-8ab4-0f6064571a5e", "customer_email": "a@b.test",
                    "items": [{"ticket_type": "GA", "quantity": 1}]}
            for _ in range(2):
                r = await http.post("/v1/checkouts", json=body, headers={"Idempotency-Key": "retry-me"})
                assert r.status_code == 503
    finally:
        lonely.stop()


async def test_idempotency_key_replays_the_gateways_own_mutations(tenant):
    key = {"Idempotency-Key": "mint-once"}
    first = await tenant.post("/v1/api-keys", {"name": "pos", "role": "staff"}, headers=key)
    again = await tenant.post("/v1/api-keys", {"name": "pos", "role": "staff"}, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    keys = (await tenant.get("/v1/api-keys")).json()["api_keys"]
    assert [k["name"] for k in keys].count("pos") == 1
    # a failure is replayed too: the same key with a forbidden role stays forbidden
    bad = {"Idempotency-Key": "bad-role"}
    partner = (await tenant.post("/v1/api-keys", {"name": "partner"})).json()["api_key"]
    for _ in range(2):
        r = await tenant.post("/v1/devices", {"name": "x"}, token=partner, headers=bad)
        assert r.status_code == 403
    # keys are per credential: the owner's use of "mint-once" is not the partner's
    r = await tenant.post("/v1/checkouts", {"event_id": "01a232f9-c16b-7419-8ab4-0f6064571a5e",
                                            "customer_email": "a@b.test",
                                            "items": [{"ticket_type": "GA", "quantity": 1}]},
                          token=partner, headers=key)
    assert r.status_code == 404  # its own fresh request (that event does not exist)
    assert (await tenant.post("/v1/api-keys", {"name": "pos"}, headers={"Idempotency-Key": "has spaces"})
            ).status_code == 422


async def test_every_mutating_route_takes_an_idempotency_key(tenant):
    event = await tenant.create_event()
    device = await tenant.device(event["event_id"])
    scan = {"event_id": event["event_id"], "ticket_code": "TKT-nobody-has-this"}
    first = await tenant.post("/v1/scans", scan, token=device, headers={"Idempotency-Key": "s1"})
    again = await tenant.post("/v1/scans", scan, token=device, headers={"Idempotency-Key": "s1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["scan_id"] == first.json()["scan_id"]  # one scan recorded, not two
    assert again.headers["idempotent-replayed"] == "true"
    # without a key, the same body is a second scan with its own id
    other = await tenant.post("/v1/scans", scan, token=device)
    assert other.json()["scan_id"] != first.json()["scan_id"]
