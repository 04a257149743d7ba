"""The NATS users and permissions as rendered: who may publish commands and whose events, who may
listen where, and that deploy/nats holds exactly the rendered block."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from libs.context import generate_key_pair
from libs.nats_auth import (
    ADMIN,
    CONSUMERS,
    GATEWAY,
    SERVICE_USERS,
    USERS,
    connect_options,
    generate_password,
    generate_passwords,
    permissions,
    render_authorization,
)
from libs.settings import Settings
from libs.subjects import EVENTS_SUBJECTS

DEPLOY = Path(__file__).parents[2] / "deploy" / "nats"
SERVICES = [u for u in SERVICE_USERS if u != GATEWAY]
ORG = "5f0b7e4a-0000-4000-8000-000000000001"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def may(user: str, kind: str, subject: str) -> bool:
    perms = permissions(user)
    assert perms is not None
    return any(matches(p, subject) for p in getattr(perms, kind))


def test_the_subject_matcher_of_these_tests():
    assert matches("vge.cmd.>", "vge.cmd.scanning.scan")
    assert not matches("vge.cmd.>", "vge.cmd")
    assert matches("vge.evt.*.scanning.>", f"vge.evt.{ORG}.scanning.scan.accepted")
    assert not matches("vge.evt.*.scanning.>", f"vge.evt.{ORG}.payments.ticket.issued")


@pytest.mark.parametrize("service", ["scanning", "payments", "audit"])
def test_only_the_gateway_may_publish_commands(service: str):
    for target in ("scanning", "payments", "audit"):
        subject = f"vge.cmd.{target}.anything"
        assert may(GATEWAY, "publish", subject)
        assert not may(service, "publish", subject), (service, subject)


@pytest.mark.parametrize("user", SERVICE_USERS)
def test_each_user_publishes_only_its_own_events(user: str):
    for owner in SERVICE_USERS:
        subject = f"vge.evt.{ORG}.{owner}.thing.happened"
        assert may(user, "publish", subject) is (owner == user), (user, subject)


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_listens_to_its_own_commands_and_answers_through_responses(service: str):
    perms = permissions(service)
    assert perms is not None and perms.allow_responses
    for target in SERVICE_USERS:
        assert may(service, "subscribe", f"vge.cmd.{target}.x") is (target == service)
    # no publish right on inboxes: replies go out through allow_responses only
    assert not may(service, "publish", "_INBOX.gateway.abc.1")


def test_the_gateway_listens_to_no_command_and_follows_occupancy_and_its_broadcast():
    for target in SERVICE_USERS:
        assert not may(GATEWAY, "subscribe", f"vge.cmd.{target}.x")
    assert may(GATEWAY, "subscribe", f"vge.evt.{ORG}.scanning.occupancy.changed")
    assert not may(GATEWAY, "subscribe", f"vge.evt.{ORG}.scanning.scan.accepted")
    assert may(GATEWAY, "subscribe", "vge.gw.credential.revoked")
    assert may(GATEWAY, "publish", "vge.gw.credential.revoked")
    assert not any(may(s, kind, "vge.gw.credential.revoked") for s in SERVICES
                   for kind in ("publish", "subscribe"))


@pytest.mark.parametrize("user", SERVICE_USERS)
def test_inboxes_are_private(user: str):
    assert connect_options(user, "pw")["inbox_prefix"] == f"_INBOX.{user}"
    for other in SERVICE_USERS:
        assert may(user, "subscribe", f"_INBOX.{other}.abc.1") is (other == user)


def test_consumer_rights_follow_the_consumer_table():
    scanning = permissions("scanning")
    assert scanning is not None
    create = "$JS.API.CONSUMER.CREATE.VGE_EVENTS.scanning-registry.vge.evt.*.payments.>"
    assert create in scanning.publish
    assert may("scanning", "publish", "$JS.ACK.VGE_EVENTS.scanning-registry.1.2.1.17.0")
    assert may("scanning", "publish", "vge.dlq.scanning-registry")
    # nothing of the audit consumer: scanning cannot read, ack or dead-letter for it
    for subject in ("$JS.API.CONSUMER.MSG.NEXT.VGE_EVENTS.audit", "vge.dlq.audit",
                    "$JS.ACK.VGE_EVENTS.audit.1.2.1.17.0", "$JS.API.CONSUMER.INFO.VGE_EVENTS.audit"):
        assert not may("scanning", "publish", subject)
    # payments has no consumer: no consumer API at all
    payments = permissions("payments")
    assert payments is not None
    assert not [s for s in payments.publish if "CONSUMER" in s or "$JS.ACK" in s]
    # never delete or purge a stream
    for user in SERVICE_USERS:
        assert not may(user, "publish", "$JS.API.STREAM.DELETE.VGE_EVENTS")
        assert not may(user, "publish", "$JS.API.STREAM.PURGE.VGE_EVENTS")


def test_the_consumer_table_is_what_the_services_declare():
    from services.audit.bootstrap import build as audit
    from services.gateway.bootstrap import build as gateway
    from services.payments.bootstrap import build as payments
    from services.scanning.bootstrap import build as scanning

    private, public = generate_key_pair()
    settings = Settings(nats_url="nats://x", database_url="postgresql://x", redis_url="redis://x",
                        context_private_key=private, context_public_keys=public)
    builds = (("gateway", gateway), ("scanning", scanning), ("payments", payments), ("audit", audit))
    for name, build in builds:
        runtime = build(settings)
        declared = {
            spec["durable"]: spec.get("filter_subject", EVENTS_SUBJECTS)
            for spec in runtime._consumer_specs
        }
        assert declared == dict(CONSUMERS.get(name, {})), name


def test_the_admin_is_unrestricted_and_every_user_is_rendered():
    assert permissions(ADMIN) is None
    passwords = generate_passwords()
    block = render_authorization(passwords)
    for user in USERS:
        assert f'user: "{user}"\n      password: "{passwords[user]}"' in block
    admin = block[block.index('user: "admin"'):]
    assert "permissions" not in admin
    assert block.count("allow_responses: true") == len(SERVICES)


def test_without_passwords_the_block_reads_them_from_the_environment():
    block = render_authorization()
    for user in USERS:
        assert f"password: $VGE_NATS_PASSWORD_{user.upper()}\n" in block


@pytest.mark.parametrize(
    "passwords",
    [
        {user: "x" * 20 for user in USERS if user != "audit"},  # one missing
        {**{user: "x" * 20 for user in USERS}, "mallory": "x" * 20},  # an unknown user
        {**{user: "x" * 20 for user in USERS}, "audit": 'bad" quote'},  # would break the file
        {**{user: "x" * 20 for user in USERS}, "audit": "short"},
    ],
)
def test_bad_passwords_are_refused(passwords: dict[str, str]):
    with pytest.raises(ValueError):
        render_authorization(passwords)


def test_unknown_users_have_no_permissions():
    with pytest.raises(ValueError):
        permissions("mallory")
    assert connect_options(None, None) == {}


def test_deploy_auth_conf_is_the_rendered_block():
    text = (DEPLOY / "auth.conf").read_text()
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    assert body == render_authorization(), "python -m libs.nats_auth > deploy/nats/auth.conf"
    for conf in ("nats.conf", "nats-cluster.conf"):
        assert 'include "auth.conf"' in (DEPLOY / conf).read_text()


def test_the_launcher_keeps_one_password_per_user_in_its_data_folder(tmp_path: Path):
    from libs.launcher import Stack

    first = Stack(Settings(), tmp_path)._load_nats_passwords()
    path = tmp_path / "nats-passwords.json"
    assert set(first) == set(USERS) and path.stat().st_mode & 0o777 == 0o600
    assert Stack(Settings(), tmp_path)._load_nats_passwords() == first  # a restart keeps them
    path.write_text(json.dumps({k: v for k, v in first.items() if k != "audit"}))
    again = Stack(Settings(), tmp_path)._load_nats_passwords()
    assert again["audit"] and {k: v for k, v in again.items() if k != "audit"} == {
        k: v for k, v in first.items() if k != "audit"
    }
    render_authorization(again)  # valid for the server


def test_generated_passwords_are_letters_and_digits_starting_with_a_letter():
    # what nats-server reads back unchanged from an environment variable (see generate_password)
    drawn = [generate_password() for _ in range(2000)]
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31}", p) for p in drawn)
    assert len(set(drawn)) == len(drawn)
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{31}", p) for p in generate_passwords().values())
