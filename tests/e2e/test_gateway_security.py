"""Tenancy, policy and credentials at the door (design §3, §4): another tenant's things are 404,
a role that may not is 403, no or a dead credential is 401, and the services themselves refuse
a command that the gateway did not sign."""

from __future__ import annotations

import asyncio
import time
import uuid

import jwt
import nats
import pytest

from libs.context import CONTEXT_HEADER


async def test_another_tenants_event_checkout_and_audit_are_404(tenant, other_tenant):
    event = await other_tenant.create_event(tickets=5)
    await other_tenant.occupancy_when_known(event["event_id"])  # its owner sees it: the 404s below are ours
    checkout = (await other_tenant.post("/v1/checkouts", {
        "event_id": event["event_id"], "customer_email": "b@b.test",
        "items": [{"ticket_type": "GA", "quantity": 1}]})).json()
    cid = checkout["checkout_id"]
    attempts = [
        await tenant.get(f"/v1/events/{event['event_id']}/occupancy"),
        await tenant.get(f"/v1/events/{event['event_id']}/occupancy/stream"),
        await tenant.post("/v1/checkouts", {"event_id": event["event_id"], "customer_email": "a@b.test",
                                            "items": [{"ticket_type": "GA", "quantity": 1}]}),
        await tenant.get(f"/v1/checkouts/{cid}"),
        await tenant.post(f"/v1/checkouts/{cid}/complete", {"payment_token": "tok_ok"},
                          headers={"Idempotency-Key": "x"}),
        await tenant.post(f"/v1/checkouts/{cid}/refund"),
        await tenant.http.get("/v1/audit", headers={**tenant.auth(),
                                                    "Vge-Organization-Id": str(other_tenant.org)}),
    ]
    for r in attempts:
        assert r.status_code == 404, (r.request.url, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "not_found" and r.json()["correlation_id"]
    # and the other tenant's checkout is untouched: still pending, nothing charged
    mine = await other_tenant.get(f"/v1/checkouts/{cid}")
    assert mine.json()["status"] == "pending"
    # a ticket code of another tenant is unknown, not "someone else's"
    sold = await other_tenant.buy(event["event_id"])
    theirs = await other_tenant.device(event["event_id"])
    known = await other_tenant.scan_until_known(theirs, event["event_id"], sold["tickets"][0]["ticket_code"])
    assert known["result"] == "accepted"  # it exists, for its own tenant
    my_event = await tenant.create_event()
    device = await tenant.device(my_event["event_id"])
    r = await tenant.post("/v1/scans", {"event_id": my_event["event_id"],
                                        "ticket_code": sold["tickets"][0]["ticket_code"]}, token=device)
    assert r.json()["reason"] == "unknown_ticket"


async def test_a_viewer_may_not_refund_and_a_key_cannot_outrank_its_minter(tenant, platform):
    event = await tenant.create_event()
    bought = await tenant.buy(event["event_id"])
    viewer = await tenant.post("/v1/api-keys", {"name": "dashboard", "role": "viewer"})
    assert viewer.status_code == 201 and viewer.json()["api_key"].startswith("vge_ak_")
    r = await tenant.post(f"/v1/checkouts/{bought['checkout_id']}/refund", token=viewer.json()["api_key"])
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    # the same with a user JWT of the configured issuer
    user = jwt.encode({"sub": "user-7", "org_id": str(tenant.org), "role": "viewer",
                       "iss": platform.settings.jwt_issuer, "exp": int(time.time()) + 60},
                      platform.settings.jwt_hs256_secret, algorithm="HS256")
    r = await tenant.post(f"/v1/checkouts/{bought['checkout_id']}/refund", token=user)
    assert r.status_code == 403
    await tenant.occupancy_when_known(event["event_id"])
    occupancy = await tenant.get(f"/v1/events/{event['event_id']}/occupancy", token=user)
    assert occupancy.status_code == 200  # a viewer may look
    admin = (await tenant.post("/v1/api-keys", {"name": "ops", "role": "admin"})).json()["api_key"]
    r = await tenant.post("/v1/api-keys", {"name": "escalate", "role": "owner"}, token=admin)
    assert r.status_code == 403
    # an integration key (no role) sells but cannot manage credentials
    partner = (await tenant.post("/v1/api-keys", {"name": "box office"})).json()["api_key"]
    assert (await tenant.post("/v1/checkouts", {"event_id": event["event_id"], "customer_email": "a@b.test",
            "items": [{"ticket_type": "GA", "quantity": 1}]}, token=partner)).status_code == 201
    assert (await tenant.post("/v1/devices", {"name": "x"}, token=partner)).status_code == 403


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer nonsense",
                                    "Bearer vge_ak_" + "0" * 64 + "_" + "A" * 43])
async def test_no_or_a_bad_credential_is_401(tenant, header):
    r = await tenant.http.get("/v1/ledger/balances", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_jwts_expired_or_foreign_are_401(tenant, platform):
    s = platform.settings
    claims = {"sub": "u1", "org_id": str(tenant.org), "role": "owner", "iss": s.jwt_issuer}
    expired = jwt.encode({**claims, "exp": int(time.time()) - 5}, s.jwt_hs256_secret, algorithm="HS256")
    foreign = jwt.encode({**claims, "exp": int(time.time()) + 60}, "another-key-another-key-another!",
                         algorithm="HS256")
    other_issuer = jwt.encode({**claims, "iss": "https://evil.test", "exp": int(time.time()) + 60},
                              s.jwt_hs256_secret, algorithm="HS256")
    for token in (expired, foreign, other_issuer):
        r = await tenant.get("/v1/ledger/balances", token=token)
        assert r.status_code == 401, token
    good = jwt.encode({**claims, "exp": int(time.time()) + 60}, s.jwt_hs256_secret, algorithm="HS256")
    assert (await tenant.get("/v1/ledger/balances", token=good)).status_code == 200


async def test_revoked_device_and_api_key_are_refused_at_once(tenant):
    event = await tenant.create_event()
    reg = (await tenant.post("/v1/devices", {"name": "gate", "event_id": event["event_id"]})).json()
    token = (await tenant.http.post("/v1/devices/enrol",
                                    json={"enrolment_token": reg["enrolment_token"]})).json()["device_token"]
    scan = {"event_id": event["event_id"], "ticket_code": "TKT-unknown-code"}
    assert (await tenant.post("/v1/scans", scan, token=token)).status_code == 200  # now cached
    revoked = await tenant.post(f"/v1/devices/{reg['device_id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    r = await tenant.post("/v1/scans", scan, token=token)
    assert r.status_code == 401 and r.json()["reason"] == "revoked"

    await tenant.occupancy_when_known(event["event_id"])  # (a 404 before it would not be the key's doing)
    key = (await tenant.post("/v1/api-keys", {"name": "temp", "role": "staff"})).json()
    assert (await tenant.get(f"/v1/events/{event['event_id']}/occupancy", token=key["api_key"])).status_code == 200
    assert (await tenant.post(f"/v1/api-keys/{key['api_key_id']}/revoke")).status_code == 200
    assert (await tenant.get(f"/v1/events/{event['event_id']}/occupancy", token=key["api_key"])).status_code == 401
    listed = {k["api_key_id"]: k for k in (await tenant.get("/v1/api-keys")).json()["api_keys"]}
    assert listed[key["api_key_id"]]["revoked_at"] and "api_key" not in listed[key["api_key_id"]]


async def test_revocation_reaches_every_gateway_replica(tenant, start_service, platform):
    from services.gateway.bootstrap import build

    second = await start_service(build, gateway_port=0)
    event = await tenant.create_event()
    await tenant.occupancy_when_known(event["event_id"])
    reg = (await tenant.post("/v1/devices", {"name": "gate"})).json()
    token = (await tenant.http.post("/v1/devices/enrol",
                                    json={"enrolment_token": reg["enrolment_token"]})).json()["device_token"]
    replica = f"http://127.0.0.1:{second.http_port}"
    path = f"/v1/events/{event['event_id']}/occupancy"
    headers = {"Authorization": f"Bearer {token}"}
    assert (await tenant.http.get(replica + path, headers=headers)).status_code == 200  # cached there
    await tenant.post(f"/v1/devices/{reg['device_id']}/revoke")  # on the first replica
    deadline = asyncio.get_running_loop().time() + 2  # well inside the 10 s cache lifetime
    while (await tenant.http.get(replica + path, headers=headers)).status_code != 401:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def test_enrolment_token_is_single_use_even_when_raced(tenant):
    reg = (await tenant.post("/v1/devices", {"name": "gate", "gate": "South"})).json()
    assert reg["enrolment_qr"].startswith("voelgoed-enrol:") and reg["enrolment_token"] in reg["enrolment_qr"]
    body = {"enrolment_token": reg["enrolment_token"]}
    results = await asyncio.gather(*(tenant.http.post("/v1/devices/enrol", json=body) for _ in range(5)))
    assert sorted(r.status_code for r in results) == [200, 401, 401, 401, 401]
    winner = next(r for r in results if r.status_code == 200).json()
    assert winner["device_id"] == reg["device_id"] and winner["gate"] == "South"
    # the device may roll its own token; the old one stops working
    rolled = await tenant.post(f"/v1/devices/{reg['device_id']}/token", token=winner["device_token"])
    assert rolled.status_code == 200 and rolled.json()["device_token"] != winner["device_token"]
    assert (await tenant.get("/v1/devices", token=winner["device_token"])).status_code == 401
    assert (await tenant.post(f"/v1/devices/{reg['device_id']}/token",
                              token=rolled.json()["device_token"])).status_code == 200


async def test_a_device_bound_to_an_event_cannot_scan_another(tenant):
    bound_event, other_event = await tenant.create_event(), await tenant.create_event()
    device = await tenant.device(bound_event["event_id"])
    sold = await tenant.buy(other_event["event_id"])
    # (until scanning's registry has the sale, the ticket is simply unknown)
    refused = await tenant.scan_until_known(device, other_event["event_id"],
                                            sold["tickets"][0]["ticket_code"])
    assert refused["result"] == "rejected" and refused["reason"] == "device_not_allowed"
    # a device cannot manage credentials or sell
    assert (await tenant.post("/v1/devices", {"name": "x"}, token=device)).status_code == 403
    assert (await tenant.get("/v1/ledger/balances", token=device)).status_code == 403


async def test_a_command_without_the_gateways_signature_is_refused(tenant, platform, nats_url):
    event = await tenant.create_event()
    nc = await nats.connect(nats_url)
    try:
        body = ('{"event_id": "%s", "ticket_code": "TKT-x"}' % event["event_id"]).encode()
        for headers in ({}, {CONTEXT_HEADER: "forged.context.0123456789abcdef"}):
            reply = await nc.request("vge.cmd.scanning.scan", body, timeout=5, headers=headers)
            assert reply.headers["Vge-Status"] == "error"
            assert b'"unauthenticated"' in reply.data
        reply = await nc.request("vge.cmd.payments.refund_checkout",
                                 ('{"checkout_id": "%s"}' % uuid.uuid4()).encode(), timeout=5)
        assert b'"unauthenticated"' in reply.data
    finally:
        await nc.close()


async def test_an_open_occupancy_stream_ends_when_its_credential_is_revoked(tenant):
    event = await tenant.create_event()
    await tenant.occupancy_when_known(event["event_id"])  # (the stream starts with it: a 404 before)
    key = (await tenant.post("/v1/api-keys", {"name": "wallboard", "role": "viewer"})).json()
    async with tenant.http.stream("GET", f"/v1/events/{event['event_id']}/occupancy/stream",
                                  headers=tenant.auth(key["api_key"])) as stream:
        lines = stream.aiter_lines()
        assert (await anext(lines)).startswith("event: occupancy")
        assert (await tenant.post(f"/v1/api-keys/{key['api_key_id']}/revoke")).status_code == 200

        async def until_error() -> str:
            async for line in lines:
                if line.startswith("event: error"):
                    return (await anext(lines))
            raise AssertionError("stream ended without saying why")

        data = await asyncio.wait_for(until_error(), 10)  # heartbeat is 1 s in these tests
        assert '"unauthenticated"' in data and '"revoked"' in data


async def test_a_platform_admins_read_of_a_tenant_is_in_that_tenants_audit_log(tenant, platform):
    s = platform.settings
    admin = jwt.encode({"sub": "ops-1", "platform_admin": True, "iss": s.jwt_issuer,
                        "exp": int(time.time()) + 60}, s.jwt_hs256_secret, algorithm="HS256")
    corr = f"platform-read-{uuid.uuid4().hex[:8]}"
    as_admin = {"Authorization": f"Bearer {admin}", "Vge-Organization-Id": str(tenant.org),
                "X-Correlation-Id": corr}
    r = await tenant.http.get("/v1/ledger/balances", headers=as_admin)
    assert r.status_code == 200, r.text  # it may read the tenant's data ...
    deadline = asyncio.get_running_loop().time() + 15
    while True:  # ... and the tenant sees that it did (the audit log catches up from JetStream)
        records = (await tenant.get("/v1/audit", correlation_id=corr)).json()["records"]
        if records:
            break
        assert asyncio.get_running_loop().time() < deadline, "the platform read was not audited"
        await asyncio.sleep(0.2)
    [record] = records
    assert record["action"] == "organization.read_by_platform"
    assert record["organization_id"] == str(tenant.org)
    assert record["actor"]["user_id"] == "ops-1" and record["actor"]["is_platform_admin"] is True
    assert record["change"]["path"] == "/v1/ledger/balances"
    # a tenant that does not exist is not there for it either, and nothing is served
    nowhere = {**as_admin, "Vge-Organization-Id": str(uuid.uuid4())}
    r = await tenant.http.get("/v1/audit", headers=nowhere)
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text


async def test_a_platform_read_that_cannot_be_recorded_is_not_served(tenant, platform, monkeypatch):
    from services.gateway.adapters.postgres import GatewayStore

    async def database_gone(self, *args, **kwargs):
        raise ConnectionRefusedError("gateway database down")

    monkeypatch.setattr(GatewayStore, "record_platform_read", database_gone)
    s = platform.settings
    admin = jwt.encode({"sub": "ops-2", "platform_admin": True, "iss": s.jwt_issuer,
                        "exp": int(time.time()) + 60}, s.jwt_hs256_secret, algorithm="HS256")
    r = await tenant.http.get("/v1/ledger/balances", headers={
        "Authorization": f"Bearer {admin}", "Vge-Organization-Id": str(tenant.org)})
    assert r.status_code == 503 and r.json()["code"] == "unavailable", r.text
    assert "accounts" not in r.json()
    # the tenant's own reads are not recorded, so they do not depend on it
    assert (await tenant.get("/v1/ledger/balances")).status_code == 200
