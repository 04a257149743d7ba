"""Every command, reply and event payload of the platform, as pydantic models.

Defined once here so producers and consumers share one shape and every service's AsyncAPI comes
from the same models. Commands are named as imperatives (``AdmitTicket``), events in the past
tense (``TicketAdmitted``). An event model is the envelope's ``data``; ``EventData.envelope``
wraps it and ``EventData.from_envelope`` reads it back.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from functools import cache
from typing import Annotated, Any, ClassVar, Literal, Self, get_args, get_origin
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, ValidationInfo, model_validator

from libs.actor import Actor
from libs.envelope import Envelope

__all__ = ["Command", "Reply", "EventData", "CHECKED_INSTANT", "dump_json_in_slices"]

# Items of a long list validated between two returns to the event loop in
# ``Command.parse_in_slices``: 250 offline scans take ~1-2.5 ms here.
PARSE_SLICE = 250
# the validation context of a sliced parse: the fields whose items it checked already
_CHECKED_FIELDS = "vge.checked_fields"


class CheckedInstant:
    """Marks a time type whose own validator already makes every value an instant in UTC
    (``Annotated[datetime, AfterValidator(...), CHECKED_INSTANT]``): the command rules below
    need not look at it again."""


CHECKED_INSTANT = CheckedInstant()

_OPAQUE = (UUID, bool, int, float, Enum)  # parsed values that can hold no text and no time


def _may_hold_unchecked(tp: Any) -> bool:
    """Whether a value of type ``tp`` may hold text or a time not yet checked."""
    origin = get_origin(tp)
    if origin is Annotated:
        return CHECKED_INSTANT not in tp.__metadata__ and _may_hold_unchecked(get_args(tp)[0])
    if origin is Literal or tp is type(None):
        return False
    if origin is not None:  # a union or a container: whatever its parts may hold
        return any(_may_hold_unchecked(arg) for arg in get_args(tp)) or not get_args(tp)
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return bool(_fields_to_check(tp))
        if issubclass(tp, str):
            return not issubclass(tp, Enum)
        if issubclass(tp, _OPAQUE):
            return False
    return True  # Any, datetime, anything unknown: look


@cache
def _fields_to_check(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``cls`` the command rules must look into (worked out once per model, so
    an upload of 10,000 scans is not 80,000 ``getattr`` calls)."""
    return tuple(
        name for name, f in cls.model_fields.items()
        if CHECKED_INSTANT not in f.metadata and _may_hold_unchecked(f.annotation)
    )  # fmt: skip


@cache
def _listed_models(cls: type[BaseModel]) -> tuple[tuple[str, TypeAdapter[list[Any]]], ...]:
    """The fields of ``cls`` that are lists of models and may be read or written a slice at a
    time, each with an adapter for a slice: none where that could differ from one go (a
    validator that sees the raw input, a serializer of the model's own, a ``Decimal``, a field
    left out of the JSON or named otherwise in it)."""
    decorators = cls.__pydantic_decorators__
    if decorators.model_serializers or not _same_from_python(cls) or any(
        d.info.mode != "after" for d in decorators.model_validators.values()
    ):
        return ()
    own = {f for d in (*decorators.field_validators.values(), *decorators.field_serializers.values())
           for f in d.info.fields}  # fmt: skip
    found = []
    for name, f in cls.model_fields.items():
        (item,) = get_args(f.annotation) if get_origin(f.annotation) is list else (None,)
        renamed = f.alias or f.validation_alias or f.serialization_alias or f.exclude
        if isinstance(item, type) and issubclass(item, BaseModel) and name not in own and not renamed:
            found.append((name, TypeAdapter(list[item])))  # type: ignore[valid-type]
    return tuple(found)


def _same_from_python(tp: Any, seen: frozenset[type] = frozenset()) -> bool:
    """Whether pydantic makes the same value of type ``tp`` from orjson's reading of a JSON
    text as from the text itself: not for a ``Decimal``, which orjson reads as a float first."""
    if get_origin(tp) is not None:
        return all(_same_from_python(arg, seen) for arg in get_args(tp))
    if not isinstance(tp, type):
        return True  # a Literal's value, an Annotated's metadata
    if issubclass(tp, Decimal):
        return False
    if issubclass(tp, BaseModel) and tp not in seen:
        return all(_same_from_python(f.annotation, seen | {tp}) for f in tp.model_fields.values())
    return True


def _storable(value: Any) -> None:
    """Refuse what no service could store, anywhere in a parsed command: U+0000 in text
    (PostgreSQL text cannot hold it), and a time that is no instant in UTC
    (``0001-01-01T00:00+01:00`` is before year 1)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain U+0000 (NUL)")
    elif isinstance(value, BaseModel):
        fields = value.__dict__
        for name in _fields_to_check(type(value)):
            field = fields[name]
            # text and nothing inline: most fields of a command (half the time of an upload's
            # 10,000 scans went into calls for them)
            if type(field) is str:
                if "\x00" in field:
                    raise ValueError("text must not contain U+0000 (NUL)")
            elif field is not None:
                _storable(field)
    elif isinstance(value, datetime):
        if value.utcoffset() is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                raise ValueError(f"{value.isoformat()} is out of range") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key)
            _storable(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _storable(item)


class Command(BaseModel):
    """Base of command payloads: unknown fields are refused, not ignored, and so is anything the
    services could not store (a NUL character, a time out of range), which would otherwise
    fail deep inside a handler instead of as ``invalid_input``; over NATS and HTTP alike."""

    model_config = ConfigDict(extra="forbid")

    # after, not before, validation: a "before" validator makes pydantic build the whole JSON
    # as Python objects first, and walk them again; this looks only where text or times can be
    @model_validator(mode="after")
    def _storable_only(self, info: ValidationInfo) -> Self:
        checked = (info.context or {}).get(_CHECKED_FIELDS, ())
        for name in _fields_to_check(type(self)):
            if name not in checked:
                _storable(getattr(self, name))
        return self

    @classmethod
    async def parse_in_slices(cls, body: bytes | str, *, slice_size: int = PARSE_SLICE) -> Self:
        """This command from its JSON, as ``model_validate_json`` gives it (the same model, the
        same errors), with the event loop given back while its long lists of models are
        validated, ``slice_size`` items at a time. For big commands (an offline upload of
        10,000 scans): validated in one go, it held the loop 45-100 ms, and every gate's scan
        the service received meanwhile waited for all of it.

        Anything refused is parsed again in one go, for pydantic's own error: a bad upload is
        rare, and its error then names the item as a one-go parse does."""
        listed = _listed_models(cls)
        if not listed:
            return cls.model_validate_json(body)
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            return cls.model_validate_json(body)
        long = [(name, items_of) for name, items_of in listed
                if isinstance(raw, dict) and isinstance(raw.get(name), list) and len(raw[name]) > slice_size]
        if not long:
            return cls.model_validate_json(body)
        checked: set[str] = set()
        try:
            for name, items_of in long:
                items = raw[name]
                parsed: list[Any] = []
                for start in range(0, len(items), slice_size):
                    await asyncio.sleep(0)
                    part = items_of.validate_python(items[start:start + slice_size])
                    _storable(part)
                    parsed.extend(part)
                # (the field's own rules, e.g. its length, are checked below: pydantic takes a
                # model instance of the right class as it is, without validating it again)
                raw[name] = parsed
                checked.add(name)
            await asyncio.sleep(0)
            return cls.model_validate(raw, context={_CHECKED_FIELDS: checked})
        except (ValidationError, ValueError):
            return cls.model_validate_json(body)


class Reply(BaseModel):
    """Base of command replies."""


async def dump_json_in_slices(model: BaseModel, *, slice_size: int = PARSE_SLICE) -> bytes:
    """``model``'s JSON, as ``model_dump_json`` writes it, with the event loop given back while
    its long lists of models are written, ``slice_size`` items at a time (an offline upload's
    10,000 scans or results took ~15-25 ms in one go). A long list comes after the other
    fields, whatever its place in the model: the same JSON object, keys in another order."""
    long = [(name, adapter) for name, adapter in _listed_models(type(model))
            if len(getattr(model, name)) > slice_size]
    if not long:
        return model.model_dump_json().encode()
    head = model.model_dump_json(exclude={name for name, _ in long}).encode()
    written = [head[:-1]]  # (without its closing brace)
    for name, adapter in long:
        items = getattr(model, name)
        slices = []
        for start in range(0, len(items), slice_size):
            await asyncio.sleep(0)
            slices.append(adapter.dump_json(items[start:start + slice_size])[1:-1])
        written.append(b"%s%s:[%s]" % (b"," if written[-1] != b"{" else b"", orjson.dumps(name),
                                         b",".join(slices)))
    return b"".join(written) + b"}"


class EventData(BaseModel):
    """Base of event payloads. Subclasses set ``event_type`` (``<entity>.<verb>``) and the
    ``service`` that owns (and alone publishes) the event."""

    event_type: ClassVar[str]
    service: ClassVar[str]
    schema_version: ClassVar[int] = 1

    def envelope(
        self,
        org_id: UUID,
        actor: Actor,
        correlation_id: str,
        causation_id: str | None = None,
        **fields: Any,
    ) -> Envelope:
        """This payload in an envelope, ready for the outbox."""
        return Envelope(
            type=self.event_type,
            schema_version=self.schema_version,
            org_id=org_id,
            actor=actor,
            correlation_id=correlation_id,
            causation_id=causation_id,
            data=self.model_dump(mode="json"),
            **fields,
        )

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> Self:
        """The typed payload of ``envelope``; raises ``ValueError`` for another event type."""
        if envelope.type != cls.event_type:
            raise ValueError(f"{envelope.type} is not {cls.event_type}")
        return cls.model_validate(envelope.data)
