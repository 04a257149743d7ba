"""The platform through its public HTTP API (design §7): scans, live occupancy, the sale and
refund of a ticket, the books and the audit trail of one correlation id."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx


async def _next_sse(lines, timeout: float) -> dict:
    """The data of the next ``occupancy`` event of an SSE stream."""
    async def read() -> dict:
        event = None
        async for line in lines:
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "occupancy":
                return json.loads(line.split(":", 1)[1])
        raise AssertionError("stream ended")

    return await asyncio.wait_for(read(), timeout)


async def test_device_scans_and_dashboard_sees_occupancy_within_a_second(tenant, platform):
    event = await tenant.create_event(tickets=5)
    device = await tenant.device(event["event_id"], gate="North")
    sold = await tenant.buy(event["event_id"], quantity=2)
    codes = [t["ticket_code"] for t in sold["tickets"]]
    await tenant.occupancy_when_known(event["event_id"])  # (the stream starts with it: a 404 before)
    stream_url = f"/v1/events/{event['event_id']}/occupancy/stream"
    async with tenant.http.stream("GET", stream_url, headers=tenant.auth()) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        first = await _next_sse(lines, 5)
        assert first["event_id"] == event["event_id"] and first["inside"] == 0

        accepted = await tenant.scan_until_known(device, event["event_id"], codes[0])
        assert accepted["result"] == "accepted" and accepted["ticket_type"] == "GA"
        seen_at = asyncio.get_running_loop().time()
        change = await _next_sse(lines, 5)
        assert change["inside"] == 1 and change["entries"] == 1
        # the dashboard hears of it within ~1 s (generous: the tick is 50 ms)
        assert asyncio.get_running_loop().time() - seen_at < 1.5

    again = await tenant.post("/v1/scans", {"event_id": event["event_id"], "ticket_code": codes[0]},
                              token=device)
    assert again.status_code == 200
    body = again.json()
    assert body["result"] == "rejected" and body["reason"] == "already_admitted"
    assert body["first_gate"] == "North" and body["first_admitted_at"] == accepted["first_admitted_at"]

    occupancy = (await tenant.get(f"/v1/events/{event['event_id']}/occupancy")).json()
    assert {k: occupancy[k] for k in ("inside", "entries", "exits", "capacity")} == {
        "inside": 1, "entries": 1, "exits": 0, "capacity": 1000}


async def test_sse_reconnect_starts_from_the_current_value(tenant):
    event = await tenant.create_event(tickets=3)
    device = await tenant.device(event["event_id"])
    sold = await tenant.buy(event["event_id"], quantity=1)
    await tenant.scan_until_known(device, event["event_id"], sold["tickets"][0]["ticket_code"])
    for _ in range(2):  # the client drops and comes back: it gets the current value first
        async with tenant.http.stream("GET", f"/v1/events/{event['event_id']}/occupancy/stream",
                                      headers=tenant.auth()) as stream:
            assert (await _next_sse(stream.aiter_lines(), 5))["inside"] == 1


async def test_sale_scan_refund_scan_books_and_audit_share_one_correlation_id(tenant):
    corr = f"e2e-{uuid.uuid4().hex}"
    same = {"X-Correlation-Id": corr}
    event = await tenant.create_event(tickets=10, price=25000)
    device = await tenant.device(event["event_id"])
    created = await tenant.post("/v1/checkouts", {
        "event_id": event["event_id"], "customer_email": "buyer@example.test",
        "items": [{"ticket_type": "GA", "quantity": 2}]}, headers=same)
    assert created.status_code == 201, created.text
    assert created.headers["x-correlation-id"] == corr
    checkout = created.json()
    assert checkout["total"] == 50000 and checkout["currency"] == "ZAR" and checkout["expires_at"]
    done = await tenant.post(f"/v1/checkouts/{checkout['checkout_id']}/complete",
                             {"payment_token": "tok_ok"}, headers={**same, "Idempotency-Key": "pay-1"})
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text
    tickets = done.json()["tickets"]
    assert len(tickets) == 2 and {t["ticket_type"] for t in tickets} == {"GA"}
    code = tickets[0]["ticket_code"]

    scanned = await tenant.scan_until_known(device, event["event_id"], code)
    assert scanned["result"] == "accepted"
    balances = {a["account"]: a for a in (await tenant.get("/v1/ledger/balances")).json()["accounts"]}
    assert balances["processor_receivable"]["balance"] == 50000
    assert sum(a["balance"] for a in balances.values()) == 0

    refund = await tenant.post(f"/v1/checkouts/{checkout['checkout_id']}/refund", headers=same)
    assert refund.status_code == 200, refund.text
    assert refund.json()["status"] == "refunded" and refund.json()["amount"] == 50000
    # the refund reaches scanning as a cancellation: the other ticket is refused at the gate
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        r = await tenant.post("/v1/scans", {"event_id": event["event_id"],
                                            "ticket_code": tickets[1]["ticket_code"]},
                              token=device, headers=same)
        if r.json()["reason"] == "cancelled":
            break
        assert asyncio.get_running_loop().time() < deadline, r.json()
        await asyncio.sleep(0.1)
    balances = {a["account"]: a for a in (await tenant.get("/v1/ledger/balances")).json()["accounts"]}
    assert balances["processor_receivable"]["balance"] == 0
    assert sum(a["balance"] for a in balances.values()) == 0

    expected = {"checkout.created", "checkout.completed", "ledger.entry_posted", "ticket.issued",
                "refund.completed", "ticket.cancelled", "scan.rejected"}
    deadline = asyncio.get_running_loop().time() + 15
    while True:  # the audit log catches up from JetStream
        records = (await tenant.get("/v1/audit", correlation_id=corr, limit=500)).json()["records"]
        actions = {r["action"] for r in records}
        if expected <= actions:
            break
        assert asyncio.get_running_loop().time() < deadline, sorted(actions)
        await asyncio.sleep(0.2)
    assert all(r["correlation_id"] == corr and r["organization_id"] == str(tenant.org) for r in records)
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)


async def test_completing_twice_with_one_key_replays_and_charges_once(tenant):
    event = await tenant.create_event(tickets=5)
    checkout = (await tenant.post("/v1/checkouts", {
        "event_id": event["event_id"], "customer_email": "a@b.test",
        "items": [{"ticket_type": "GA", "quantity": 1}]})).json()
    path = f"/v1/checkouts/{checkout['checkout_id']}/complete"
    first, second = await asyncio.gather(*(
        tenant.post(path, {"payment_token": "tok_ok"}, headers={"Idempotency-Key": "same"})
        for _ in range(2)))
    statuses = sorted([first.status_code, second.status_code])
    # concurrent: one does the work, the other is told it is in progress or replays it
    assert statuses in ([200, 200], [200, 409]), (first.text, second.text)
    replay = await tenant.post(path, {"payment_token": "tok_ok"}, headers={"Idempotency-Key": "same"})
    assert replay.status_code == 200 and replay.headers.get("idempotent-replayed") == "true"
    winner = first if first.status_code == 200 else second
    assert replay.json() == winner.json()
    other_body = await tenant.post(path, {"payment_token": "tok_decline"},
                                   headers={"Idempotency-Key": "same"})
    assert other_body.status_code == 422 and other_body.json()["reason"] == "idempotency_key_reused"
    balances = (await tenant.get("/v1/ledger/balances")).json()["accounts"]
    assert {a["account"]: a["balance"] for a in balances}["processor_receivable"] == 15000


async def test_declined_card_is_a_failed_checkout_without_tickets(tenant):
    event = await tenant.create_event(tickets=5)
    checkout = (await tenant.post("/v1/checkouts", {
        "event_id": event["event_id"], "customer_email": "a@b.test",
        "items": [{"ticket_type": "GA", "quantity": 2}]})).json()
    r = await tenant.post(f"/v1/checkouts/{checkout['checkout_id']}/complete",
                          {"payment_token": "tok_decline"}, headers={"Idempotency-Key": "k"})
    assert r.status_code == 200
    assert r.json()["status"] == "failed" and r.json()["reason"] == "declined" and r.json()["tickets"] == []
    assert (await tenant.get("/v1/ledger/balances")).json()["accounts"] == [] or all(
        a["debit"] == 0 for a in (await tenant.get("/v1/ledger/balances")).json()["accounts"])


async def test_sold_out_is_409_with_reason(tenant):
    event = await tenant.create_event(tickets=2)
    r = await tenant.post("/v1/checkouts", {"event_id": event["event_id"], "customer_email": "a@b.test",
                                            "items": [{"ticket_type": "GA", "quantity": 3}]})
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "conflict" and r.json()["reason"] == "sold_out"


async def test_offline_batch_upload_over_http(tenant):
    event = await tenant.create_event(tickets=5)
    device = await tenant.device(event["event_id"], gate="East")
    sold = await tenant.buy(event["event_id"], quantity=2)
    code_a, code_b = (t["ticket_code"] for t in sold["tickets"])
    await tenant.scan_until_known(device, event["event_id"], code_a, direction="exit")
    now = datetime.now(UTC)
    scans = [
        {"event_id": event["event_id"], "ticket_code": code_b, "nonce": "n1",
         "scanned_at": (now - timedelta(minutes=5)).isoformat()},
        {"event_id": event["event_id"], "ticket_code": code_b, "nonce": "n2", "gate": "West",
         "scanned_at": (now - timedelta(minutes=2)).isoformat()},
    ]
    r = await tenant.post("/v1/scans/batch", {"scans": scans}, token=device)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["nonce"] for x in results] == ["n1", "n2"]
    assert results[0]["result"] == "accepted" and results[0]["conflict"] is False
    assert results[1]["conflict"] is True and results[1]["reason"] == "already_admitted"
    assert results[1]["first_gate"] == "East"  # the device's own gate filled in for n1
    again = await tenant.post("/v1/scans/batch", {"scans": scans}, token=device)
    assert [x["scan_id"] for x in again.json()["results"]] == [x["scan_id"] for x in results]
    too_many = await tenant.post("/v1/scans/batch", {"scans": [scans[0]] * 10_001}, token=device)
    assert too_many.status_code == 422 and too_many.json()["code"] == "invalid_input"
    # with an Idempotency-Key, a repeat is the stored answer
    keyed = [await tenant.post("/v1/scans/batch", {"scans": scans}, token=device,
                               headers={"Idempotency-Key": "upload-1"}) for _ in range(2)]
    assert keyed[0].json() == keyed[1].json() and keyed[1].headers["idempotent-replayed"] == "true"
    assert [x["scan_id"] for x in keyed[0].json()["results"]] == [x["scan_id"] for x in results]


async def test_a_bad_offline_batch_is_refused_as_any_bad_body(tenant):
    """The batch endpoint reads its body itself (a slice at a time): it refuses a bad one as
    FastAPI refuses the bodies it reads."""
    event = await tenant.create_event(tickets=1)
    device = await tenant.device(event["event_id"], gate="East")
    scans = [{"event_id": event["event_id"], "ticket_code": f"TKT-{n}", "nonce": f"n{n}",
              "scanned_at": datetime.now(UTC).isoformat()} for n in range(600)]
    del scans[400]["nonce"]
    headers = {**tenant.auth(device), "Content-Type": "application/json"}
    missing = await tenant.post("/v1/scans/batch", {"scans": scans}, token=device)
    assert missing.status_code == 422 and missing.json()["code"] == "invalid_input"
    assert missing.json()["errors"] == [{"loc": ["body", "scans", 400, "nonce"], "msg": "Field required",
                                         "type": "missing"}]
    malformed = await tenant.http.post("/v1/scans/batch", content=b'{"scans": [', headers=headers)
    assert malformed.status_code == 400 and malformed.json()["errors"] == [
        {"loc": ["body", 11], "msg": "JSON decode error", "type": "json_invalid"}]
    empty = await tenant.http.post("/v1/scans/batch", content=b"", headers=headers)
    assert empty.status_code == 422 and empty.json()["errors"][0]["loc"] == ["body"]
    # a body that does not say it is JSON is not read as JSON
    untyped = await tenant.http.post("/v1/scans/batch", content=b'{"scans": []}',
                                     headers=tenant.auth(device))
    assert untyped.status_code == 422 and untyped.json()["errors"][0]["loc"] == ["body"]


async def test_openapi_docs_and_health(platform):
    async with httpx.AsyncClient(base_url=platform.url) as http:
        spec = (await http.get("/openapi.json")).json()
        for path in ("/v1/events", "/v1/devices", "/v1/devices/enrol", "/v1/devices/{device_id}/revoke",
                     "/v1/api-keys", "/v1/scans", "/v1/scans/batch", "/v1/events/{event_id}/occupancy",
                     "/v1/events/{event_id}/occupancy/stream", "/v1/checkouts",
                     "/v1/checkouts/{checkout_id}/complete", "/v1/checkouts/{checkout_id}/refund",
                     "/v1/ledger/balances", "/v1/audit"):
            assert path in spec["paths"], path
        # documented as FastAPI documents a body it reads, though the route reads its own
        batch = spec["paths"]["/v1/scans/batch"]["post"]["requestBody"]
        assert batch["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ScanBatchBody"}
        assert {"ScanBatchBody", "OfflineScan"} <= set(spec["components"]["schemas"])
        assert (await http.get("/docs")).status_code == 200
        health = await http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert "x-correlation-id" in health.headers
        metrics = (await http.get("/metrics")).text
        assert 'vge_http_requests_total{method="GET",route="/healthz"' in metrics
