"""The gateway reads a big JSON body (an offline upload of 10,000 scans) a slice at a time, so
the gate scans it serves meanwhile are not held up, and refuses a bad one as FastAPI would."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request

from services.gateway.api import _body_in_slices
from services.gateway.schemas import ScanBatchBody

EVENT = "01a232f9-c16b-7419-8ab4-0f6064571a5e"


def _request(body: bytes, content_type: str | None = "application/json") -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type else []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/scans/batch", "headers": headers}
    return Request(scope, receive)


def _upload(n: int) -> bytes:
    return json.dumps({"scans": [{"event_id": EVENT, "ticket_code": f"TKT-{i}", "nonce": f"n-{i}",
                                  "scanned_at": "2026-12-01T10:00:00Z"} for i in range(n)]}).encode()


async def test_a_big_upload_is_read_with_the_event_loop_turning(turns_beside):
    body = _upload(2_000)
    parsed, turns = await turns_beside(_body_in_slices(ScanBatchBody, _request(body)))
    assert parsed == ScanBatchBody.model_validate_json(body)
    assert turns >= 2_000 // 250  # FastAPI read it in one go: no other task ran meanwhile


async def test_a_bad_upload_is_refused_as_fastapi_refuses_a_body():
    body = _upload(300).replace(b'"nonce": "n-7", ', b"")
    with pytest.raises(RequestValidationError) as missing:
        await _body_in_slices(ScanBatchBody, _request(body))
    assert [(e["type"], e["loc"]) for e in missing.value.errors()] == [
        ("missing", ("body", "scans", 7, "nonce"))]
    with pytest.raises(RequestValidationError) as malformed:
        await _body_in_slices(ScanBatchBody, _request(b'{"scans": ['))
    assert [(e["type"], e["loc"], e["msg"]) for e in malformed.value.errors()] == [
        ("json_invalid", ("body", 11), "JSON decode error")]
    for request in (_request(b""), _request(_upload(1), content_type=None),
                    _request(_upload(1), "text/plain")):
        with pytest.raises(RequestValidationError) as refused:
            await _body_in_slices(ScanBatchBody, request)
        assert refused.value.errors()[0]["loc"] == ("body",)
    # JSON by another name is read as JSON
    vendor = await _body_in_slices(ScanBatchBody, _request(_upload(1), "application/vnd.x+json"))
    assert len(vendor.scans) == 1
