import uuid
async def test_manual(platform, tenant):
    ev = await tenant.create_event(tickets=3)
    probes = [
        ("GET", "/v1/audit", {"action": "\x00"}, None, {}),
        ("GET", "/v1/audit", {"resource_id": "a\x00b"}, None, {}),
        ("GET", "/v1/audit", {"correlation_id": "a\x00b"}, None, {}),
        ("GET", "/v1/audit", {"cursor": "\x00"}, None, {}),
        ("GET", "/v1/audit", {"cursor": "zzzz"}, None, {}),
        ("GET", "/v1/audit", {"since": "0001-01-01T00:00:00+05:00"}, None, {}),
        ("GET", "/v1/audit", {"since": "2026-01-01T00:00:00+23:00"}, None, {}),
        ("GET", "/v1/audit", {"limit": "99999999999999999999999"}, None, {}),
        ("GET", "/v1/audit", {"limit": "-1"}, None, {}),
        ("POST", "/v1/events", None, {"name": "x", "starts_at": "0001-01-01T00:00:00+05:00", "ends_at": "0001-01-02T00:00:00+05:00", "capacity": 1, "reentry_allowed": False, "ticket_types": [{"code": "GA", "name": "g", "price": 1, "currency": "ZAR", "quantity": 1}]}, {}),
        ("POST", "/v1/events", None, {"name": "x", "starts_at": "2026-01-01T00:00:00+23:00", "ends_at": "2026-01-02T00:00:00-23:00", "capacity": 1, "reentry_allowed": False, "ticket_types": [{"code": "GA", "name": "g", "price": 1, "currency": "ZAR", "quantity": 1}]}, {}),
        ("POST", "/v1/events", None, {"name": "x", "starts_at": "9999-12-31T23:00:00-05:00", "ends_at": "9999-12-31T23:59:59-05:00", "capacity": 1, "reentry_allowed": False, "ticket_types": [{"code": "GA", "name": "g", "price": 1, "currency": "ZAR", "quantity": 1}]}, {}),
        ("POST", "/v1/events", None, {"name": "x", "starts_at": "2026-01-01T00:00:00", "ends_at": "2026-01-02T00:00:00Z", "capacity": 1, "reentry_allowed": False, "ticket_types": [{"code": "GA", "name": "g", "price": 9999999999999999999, "currency": "ZAR", "quantity": 1}]}, {}),
        ("POST", "/v1/events", None, {"name": "x", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2026-01-02T00:00:00Z", "capacity": 99999999999, "reentry_allowed": False, "ticket_types": [{"code": "GA", "name": "g", "price": 1, "currency": "ZAR", "quantity": 99999999999}]}, {}),
        ("POST", "/v1/events", None, {"name": "x", "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2026-01-02T00:00:00Z", "capacity": 1, "reentry_allowed": False, "ticket_types": [{"code": "GA", "name": "g", "price": 1, "currency": "ZAR", "quantity": 1}]}, {"Idempotency-Key": "é\x7f".encode("latin-1")}),
        ("POST", "/v1/checkouts", None, {"event_id": ev["event_id"], "customer_email": "a@b.test", "items": [{"ticket_type": "GA", "quantity": 2**40}]}, {}),
        ("POST", "/v1/checkouts", None, {"event_id": ev["event_id"], "customer_email": "a@b.test", "items": [{"ticket_type": "GA", "quantity": 1}, {"ticket_type": "GA", "quantity": 1}]}, {}),
        ("POST", "/v1/scans", None, {"event_id": ev["event_id"], "ticket_code": "x", "scanned_at": "2026-01-01T00:00:00+23:59"}, {}),
        ("POST", "/v1/scans", None, {"event_id": ev["event_id"], "ticket_code": "x", "nonce": "n1", "scanned_at": "9999-12-31T23:59:59.999999Z"}, {}),
        ("POST", "/v1/scans/batch", None, {"scans": [{"event_id": ev["event_id"], "ticket_code": "x", "nonce": "n", "scanned_at": "2026-01-01T00:00:00"}, {"event_id": ev["event_id"], "ticket_code": "x", "nonce": "n", "scanned_at": "2026-01-01T00:00:00Z"}]}, {}),
        ("POST", "/v1/devices", None, {"name": "d", "event_id": str(uuid.uuid4())}, {}),
        ("POST", "/v1/devices/enrol", None, {"enrolment_token": "vge_en_x"}, {}),
        ("POST", "/v1/devices/enrol", None, {"enrolment_token": "vge_ak_" + "a"*150}, {}),
        ("GET", f"/v1/events/{ev['event_id']}/occupancy", None, None, {"Vge-Organization-Id": str(tenant.org).upper()}),
    ]
    for method, path, params, body, headers in probes:
        r = await tenant.http.request(method, path, params=params, json=body, headers={**tenant.auth(), **headers})
        print("PROBE", r.status_code, method, path, params, str(body)[:80], headers, r.text[:160].replace("\n"," "))
