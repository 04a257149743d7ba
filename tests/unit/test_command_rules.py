"""Rules every command keeps, over NATS and HTTP alike: nothing a service could not store."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError, model_validator

from libs.contracts import Command, Reply, dump_json_in_slices
from libs.contracts.audit import QueryAudit
from libs.contracts.payments import CreateEvent
from libs.contracts.scanning import (
    OfflineScanDecision,
    OfflineScansSynced,
    ScanOutcome,
    ScanTicket,
    SyncOfflineScans,
)

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


# -- big commands and replies, a slice at a time (an offline upload: 10,000 scans) --------------

def _upload(n: int) -> dict:
    return {"scans": [{"event_id": EVENT, "ticket_code": f"TKT-{i}", "gate": "G1", "nonce": f"n-{i}",
                       "scanned_at": f"2026-12-01T10:{i // 60 % 60:02d}:{i % 60:02d}Z"} for i in range(n)]}


async def test_a_big_command_parsed_in_slices_is_the_one_a_single_parse_gives(turns_beside):
    body = json.dumps(_upload(2_000)).encode()
    parsed, turns = await turns_beside(SyncOfflineScans.parse_in_slices(body, slice_size=250))
    assert parsed == SyncOfflineScans.model_validate_json(body)
    assert turns >= 2_000 // 250  # the loop ran other work between the slices
    # a small command is parsed in one go, and gives the same too
    small = json.dumps(_upload(3)).encode()
    one_go = SyncOfflineScans.model_validate_json(small)
    assert await SyncOfflineScans.parse_in_slices(small, slice_size=250) == one_go


async def test_a_big_command_refused_in_slices_gets_the_error_a_single_parse_gives():
    def spoiled(change) -> bytes:
        upload = _upload(2_000)
        change(upload)
        return json.dumps(upload).encode()

    bodies = [
        spoiled(lambda u: u["scans"][1_500].pop("nonce")),  # a field missing in a late slice
        spoiled(lambda u: u["scans"][1_999].update(gate="G\x00")),  # NUL: the command rules
        spoiled(lambda u: u["scans"][700].update(scanned_at="0001-01-01T00:00:00+01:00")),
        spoiled(lambda u: u.update(extra=1)),  # refused by the command, not by an item
        spoiled(lambda u: u["scans"].extend(u["scans"] * 5)),  # 12,000: more than a batch takes
        b'{"scans": [' + b"{}," * 600 + b"}",  # not JSON
        json.dumps(_upload(600)["scans"]).encode(),  # JSON, but no object
    ]
    for body in bodies:
        with pytest.raises(ValidationError) as one_go:
            SyncOfflineScans.model_validate_json(body)
        with pytest.raises(ValidationError) as sliced:
            await SyncOfflineScans.parse_in_slices(body, slice_size=250)
        # (as the router reports them: ValueError instances in the context never compare equal)
        assert sliced.value.errors(include_context=False) == one_go.value.errors(include_context=False)


async def test_a_big_reply_or_command_written_in_slices_is_the_json_a_single_dump_gives(turns_beside):
    decided = [OfflineScanDecision(nonce=f"n-{i}", result=ScanOutcome.ACCEPTED, scan_id=uuid.uuid4(),
                                   ticket_type="GA", first_admitted_at=datetime(2026, 12, 1, 10, tzinfo=UTC),
                                   first_gate="G1") for i in range(1_000)]
    reply = OfflineScansSynced(results=decided)
    written, turns = await turns_beside(dump_json_in_slices(reply, slice_size=250))
    assert written == reply.model_dump_json().encode()  # the same bytes: the list is its only field
    assert turns >= 1_000 // 250

    class Listed(Reply):
        """A long list between two other fields."""

        before: int
        results: list[OfflineScanDecision]
        after: str

    listed = Listed(before=1, results=decided, after="x")
    written = await dump_json_in_slices(listed, slice_size=250)
    assert json.loads(written) == json.loads(listed.model_dump_json())
    assert await dump_json_in_slices(OfflineScansSynced(results=decided[:3]), slice_size=250) == \
        OfflineScansSynced(results=decided[:3]).model_dump_json().encode()
    # a command too (the gateway sends an upload so), its scans now after its other field
    upload = SyncOfflineScans.model_validate(_upload(1_000))
    written = await dump_json_in_slices(upload, slice_size=250)
    assert json.loads(written) == json.loads(upload.model_dump_json())


async def test_a_list_is_parsed_in_one_go_where_slices_could_differ():
    class Price(BaseModel):
        """orjson reads a number as a float first: a Decimal made from it is written otherwise."""

        amount: Decimal

    class Prices(Command):
        """A command with a long list of decimals."""

        prices: list[Price]

    body = json.dumps({"prices": [{"amount": 0}] * 300}).replace("0}", "12345678901234567890.1}", 1)
    # (str: from a float, the same number is written 1.2345678901234567E+19)
    assert str((await Prices.parse_in_slices(body, slice_size=250)).prices[0].amount) == \
        str(Prices.model_validate_json(body).prices[0].amount)

    seen: list[type] = []

    class Item(BaseModel):
        """An item."""

        n: int

    class Raw(Command):
        """A command whose own validator reads the raw input: it must see what one go gives it."""

        items: list[Item]

        @model_validator(mode="before")
        @classmethod
        def _look(cls, data: Any) -> Any:
            seen.append(type(data["items"][0]))
            return data

    parsed = await Raw.parse_in_slices(json.dumps({"items": [{"n": 1}] * 300}), slice_size=250)
    assert len(parsed.items) == 300
    assert seen == [dict]

    class Hidden(Reply):
        """A reply whose long list stays out of its JSON, and one named otherwise in it."""

        items: list[Item] = Field(exclude=True)
        named: list[Item] = Field(serialization_alias="Named")

    hidden = Hidden(items=[Item(n=1)] * 300, named=[Item(n=2)] * 300)
    assert await dump_json_in_slices(hidden, slice_size=250) == hidden.model_dump_json().encode()
