"""NATS users and subject permissions: the broker holds the rules the signed context holds (§3).

One user per service plus an operator user. The rules, held by nats-server itself:

* only the gateway publishes commands (``vge.cmd.>``); a service subscribes only to its own
  commands and answers through ``allow_responses`` (it may publish to the reply subject of a
  message it received, once), so it needs no publish right on anybody's inbox;
* a service publishes only its own events (``vge.evt.*.<service>.>``), and only the dead letters
  and JetStream API calls of its own durable consumers (table :data:`CONSUMERS`);
* every user has a private inbox prefix (``_INBOX.<user>``, see :func:`connect_options`), so no
  service can read the replies meant for another (e.g. another tenant's audit query result).

What is broad, on purpose:

* every service may create and update the two streams (``ensure_streams`` runs in every service
  so that no start order is needed); that lets a service change their settings (subjects,
  retention), though not delete or purge them;
* the tenant token of an event subject is a wildcard: services serve every tenant, so the broker
  cannot tell tenants apart (the signed context and row-level security do);
* ``allow_responses`` lets a service answer any message it received with a reply subject, once
  (commands, but also its own JetStream deliveries, whose reply is their ack subject);
* the operator user (:data:`ADMIN`) has no restriction: it is for the ``nats`` CLI, the
  readiness probe and one-off operator commands, and its password belongs to operators only.

:func:`render_authorization` is pure: the launcher renders the block with generated passwords, and
the files in ``deploy/nats/`` hold the same block rendered with ``$VGE_NATS_PASSWORD_<USER>``
variables (a unit test keeps them equal).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from libs.subjects import (
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    command,
    dead_letter,
    event,
)

__all__ = [
    "ADMIN",
    "CONSUMERS",
    "GATEWAY",
    "SERVICE_USERS",
    "USERS",
    "Permissions",
    "connect_options",
    "generate_password",
    "generate_passwords",
    "inbox_prefix",
    "password_variable",
    "permissions",
    "render_authorization",
]

GATEWAY = "gateway"
ADMIN = "admin"
SERVICE_USERS = (GATEWAY, "scanning", "payments", "audit")
USERS = (*SERVICE_USERS, ADMIN)

CONSUMERS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "scanning": MappingProxyType({"scanning-registry": event("*", "payments", ">")}),
        "audit": MappingProxyType({"audit": EVENTS_SUBJECTS}),
    }
)
"""Each service's durable consumers of ``VGE_EVENTS`` (durable name -> filter subject), as the
services' bootstraps declare them. A service may read, ack and dead-letter only through these, so
one service cannot drain another's consumer (e.g. take events away from the audit log) nor read
events outside its filter. A new consumer is a permission change here, on purpose."""

_COMMANDS = "vge.cmd.>"  # every service's commands (libs.subjects.command)
# the gateway's broadcast among its replicas (e.g. vge.gw.credential.revoked)
_GATEWAY_BROADCAST = "vge.gw.>"
# what the gateway streams to dashboards (SSE) from a plain core subscription
_GATEWAY_FOLLOWS = (event("*", "scanning", "occupancy.changed"),)

# generated passwords are URL-safe base64; a config string must not need escaping
_PASSWORD = re.compile(r"[A-Za-z0-9_\-.~+/=]{12,200}")
_PASSWORD_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Permissions:
    """What one user may publish and subscribe to (NATS allow lists; the rest is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool


def inbox_prefix(user: str) -> str:
    """The inbox prefix of ``user``'s connections: replies and JetStream deliveries come here."""
    return f"_INBOX.{user}"


def password_variable(user: str) -> str:
    """The environment variable the deploy configs read ``user``'s password from."""
    return f"VGE_NATS_PASSWORD_{user.upper()}"


def _streams_api() -> list[str]:
    # ensure_streams: create, or update when the settings changed (never delete or purge); INFO
    # to read the replica count it never lowers
    return [
        f"$JS.API.STREAM.{verb}.{stream}"
        for stream in (EVENTS_STREAM, DEAD_LETTER_STREAM)
        for verb in ("CREATE", "UPDATE", "INFO")
    ]


def _consumer_api(durable: str, filter_subject: str) -> list[str]:
    # nats-py (server >= 2.9) names the filter in the create subject, so the server itself
    # refuses a consumer of this durable on any other subjects
    return [
        f"$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{durable}.{filter_subject}",
        f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}",
        f"$JS.ACK.{EVENTS_STREAM}.{durable}.>",  # ack, nak, term of its deliveries
        dead_letter(durable),
    ]


def permissions(
    user: str, consumers: Mapping[str, Mapping[str, str]] = CONSUMERS
) -> Permissions | None:
    """The allow lists of ``user``; ``None`` for :data:`ADMIN` (no restriction)."""
    if user == ADMIN:
        return None
    if user not in SERVICE_USERS:
        raise ValueError(f"unknown NATS user {user!r} (users: {', '.join(USERS)})")
    publish = [event("*", user, ">"), *_streams_api()]
    subscribe = [f"{inbox_prefix(user)}.>"]
    for durable, filter_subject in consumers.get(user, {}).items():
        publish += _consumer_api(durable, filter_subject)
    if user == GATEWAY:
        publish += [_COMMANDS, _GATEWAY_BROADCAST]
        subscribe += [*_GATEWAY_FOLLOWS, _GATEWAY_BROADCAST]
        # the gateway receives no requests: nothing to answer
        return Permissions(tuple(publish), tuple(subscribe), allow_responses=False)
    subscribe.append(command(user, ">"))
    return Permissions(tuple(publish), tuple(subscribe), allow_responses=True)


def _string(value: str) -> str:
    # JSON strings are valid NATS config strings; quoted, "$JS..." is not a variable reference
    return json.dumps(value)


def _render_user(user: str, password: str, perms: Permissions | None) -> list[str]:
    lines = ["    {", f"      user: {_string(user)}", f"      password: {password}"]
    if perms is not None:
        lines.append("      permissions: {")
        for kind, subjects in (("publish", perms.publish), ("subscribe", perms.subscribe)):
            lines.append(f"        {kind}: {{ allow: [")
            lines += [f"          {_string(s)}" for s in subjects]
            lines.append("        ] }")
        if perms.allow_responses:
            lines.append("        allow_responses: true")
        lines.append("      }")
    lines.append("    }")
    return lines


def render_authorization(
    passwords: Mapping[str, str] | None = None,
    consumers: Mapping[str, Mapping[str, str]] = CONSUMERS,
) -> str:
    """The nats-server ``authorization { users = [...] }`` block for every user of :data:`USERS`.

    ``passwords`` maps each user to its password; ``None`` renders environment variable
    references instead (``$VGE_NATS_PASSWORD_<USER>``, resolved by nats-server at start, which
    refuses to start when one is unset). No anonymous access: a connection must log in.
    """
    if passwords is not None:
        if set(passwords) != set(USERS):
            raise ValueError(f"need a password for exactly these users: {', '.join(USERS)}")
        for user, password in passwords.items():
            if not _PASSWORD.fullmatch(password):
                raise ValueError(f"password of {user!r}: 12-200 characters of [A-Za-z0-9_-.~+/=]")
    lines = ["authorization {", "  users = ["]
    for user in USERS:
        password = (
            _string(passwords[user]) if passwords is not None else f"${password_variable(user)}"
        )
        lines += _render_user(user, password, permissions(user, consumers))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def generate_password(length: int = 32) -> str:
    """A random password (~190 bits) that nats-server reads back unchanged from an environment
    variable: letters and digits, starting with a letter.

    Why so narrow: the deploy configs take the passwords as ``$VGE_NATS_PASSWORD_<USER>``, and
    nats-server parses a variable's value as a config value. One that starts with ``-`` (a
    number) or with digits and a ``-`` (a date), as ``secrets.token_urlsafe`` makes about one
    time in 75, stops the server from starting ("could not be parsed")."""
    return secrets.choice(string.ascii_letters) + "".join(
        secrets.choice(_PASSWORD_ALPHABET) for _ in range(length - 1)
    )


def generate_passwords() -> dict[str, str]:
    """A fresh random password for every user (the launcher keeps them in its data folder;
    ``vge secrets`` prints them for a deployment)."""
    return {user: generate_password() for user in USERS}


def connect_options(user: str | None, password: str | None) -> dict[str, Any]:
    """Keyword arguments of ``nats.connect`` for ``user``: its login and its private inbox
    prefix. Empty without a user (a server without authorization, e.g. the test servers)."""
    if not user:
        return {}
    return {"user": user, "password": password, "inbox_prefix": inbox_prefix(user)}


if __name__ == "__main__":
    # regenerates deploy/nats/auth.conf: python -m libs.nats_auth > deploy/nats/auth.conf
    print(
        "# The NATS users and subject permissions of the platform, rendered by libs.nats_auth:\n"
        "# edit that module and regenerate with\n"
        "#   python -m libs.nats_auth > deploy/nats/auth.conf\n"
        "# (tests/unit/test_nats_auth.py fails while the two differ). Passwords come from the\n"
        "# environment of nats-server, one variable per user; it refuses to start without one.\n"
        + render_authorization(),
        end="",
    )
