"""An AsyncAPI 3.0 description of a service, built from the same pydantic models it serves:
its commands (request/reply on ``vge.cmd.<service>.<command>``) and the events it publishes."""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel

from libs.commands import Route
from libs.contracts import EventData

__all__ = ["describe"]


def _message(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "name": model.__name__,
        "summary": (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "",
        "contentType": "application/json",
        "payload": model.model_json_schema(ref_template="#/components/schemas/{model}"),
    }


def describe(
    service: str, routes: Iterable[Route[Any, Any]], publishes: Iterable[type[EventData]] = ()
) -> dict[str, Any]:
    """The service's AsyncAPI document."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for route in routes:
        name = route.subject.rsplit(".", 1)[-1]
        channels[name] = {
            "address": route.subject,
            "messages": {"request": _message(route.request), "reply": _message(route.reply)},
        }
        operations[name] = {
            "action": "receive",
            "summary": route.summary,
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/request"}],
            "reply": {"messages": [{"$ref": f"#/channels/{name}/messages/reply"}]},
            "description": "Needs a signed Vge-Context header; errors come back as ErrorReply "
            "with header Vge-Status: error.",
        }
    for event in publishes:
        name = event.event_type.replace(".", "_")
        channels[name] = {
            "address": f"vge.evt.{{org_id}}.{event.service}.{event.event_type}",
            "parameters": {"org_id": {"description": "The tenant."}},
            "messages": {"event": _message(event)},
            "description": "The envelope (libs.envelope.Envelope) carries this as its data.",
        }
        operations[f"publish_{name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/event"}],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": f"VoelgoedEvents {service}", "version": "1"},
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
    }
