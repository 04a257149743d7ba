"""Rules every command keeps, over NATS and HTTP alike: nothing a service could not store."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from libs.contracts.audit import QueryAudit
from libs.contracts.payments import CreateEvent
from libs.contracts.scanning import ScanTicket, SyncOfflineScans

EVENT = "01a232f9-c16b-7419-8ab4-0f6064571a5e"


def test_nul_text_is_refused_at_any_depth():
    with pytest.raises(ValidationError, match="NUL"):
        ScanTicket.model_validate_json(json.dumps({"event_id": EVENT, "ticket_code": "a\x00b"}))
    nested = {"scans": [{"event_id": EVENT, "ticket_code": "ok", "nonce": "n\x00",
                         "scanned_at": "2026-12-01T10:00:00Z"}]}
    with pytest.raises(ValidationError, match="NUL"):
        SyncOfflineScans.model_validate(nested)
    with pytest.raises(ValidationError, match="NUL"):
        QueryAudit.model_validate({"action": "scan\x00"})
    assert ScanTicket.model_validate({"event_id": EVENT, "ticket_code": "TKT-1"}).ticket_code == "TKT-1"


def test_a_time_that_is_no_instant_in_utc_is_refused():
    event = {"name": "x", "starts_at": "0001-01-01T00:00:00+05:00", "ends_at": "2026-12-02T00:00:00Z",
             "capacity": 1, "ticket_types": [{"code": "GA", "name": "GA", "price": 1, "quantity": 1}]}
    with pytest.raises(ValidationError, match="out of range"):
        CreateEvent.model_validate(event)
    event["starts_at"] = "2026-12-01T00:00:00+02:00"
    assert CreateEvent.model_validate(event).starts_at.utcoffset().total_seconds() == 7200


def test_the_rules_look_only_where_text_or_an_unchecked_time_can_be():
    from libs.contracts import _fields_to_check
    from libs.contracts.scanning import OfflineScan

    # ids, enums and the device time (normalised to UTC by its own validator) are skipped
    assert _fields_to_check(OfflineScan) == ("ticket_code", "gate", "zone", "nonce")
    assert _fields_to_check(SyncOfflineScans) == ("scans",)
    assert "starts_at" in _fields_to_check(CreateEvent)  # a plain datetime is looked at


def test_nul_in_a_nested_model_and_an_out_of_range_device_time_are_refused():
    event = {"name": "x", "starts_at": "2026-12-01T00:00:00Z", "ends_at": "2026-12-02T00:00:00Z",
             "capacity": 1, "ticket_types": [{"code": "GA", "name": "G\x00A", "price": 1, "quantity": 1}]}
    with pytest.raises(ValidationError, match="NUL"):
        CreateEvent.model_validate_json(json.dumps(event))
    upload = {"scans": [{"event_id": EVENT, "ticket_code": "ok", "nonce": "n",
                         "scanned_at": "0001-01-01T00:00:00+01:00"}]}
    with pytest.raises(ValidationError, match="out of range"):
        SyncOfflineScans.model_validate_json(json.dumps(upload))
