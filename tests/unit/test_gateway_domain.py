"""The gateway's pure rules: tokens, the actor of each credential, who may mint what, JWT claims,
Idempotency-Key fingerprints, the principal's tenant."""

from __future__ import annotations

import uuid

import pytest

from libs.actor import Actor, ActorType, Role
from libs.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from services.gateway.adapters.jwt import actor_from_claims
from services.gateway.domain.credentials import (
    TokenKind,
    api_key_actor,
    device_actor,
    looks_like_jwt,
    may_grant,
    mint_token,
    parse_token,
    secret_matches,
)
from services.gateway.domain.idempotency import check_key, keeps_response, request_fingerprint
from services.gateway.handlers import Principal

ORG = uuid.UUID("01a232f9-c16b-7419-8ab4-0f6064571a5e")


def test_a_minted_token_parses_back_and_only_its_secret_matches():
    cred = uuid.uuid4()
    token, digest = mint_token(TokenKind.DEVICE, ORG, cred)
    parsed = parse_token(token)
    assert (parsed.kind, parsed.organization_id, parsed.credential_id) == (TokenKind.DEVICE, ORG, cred)
    assert secret_matches(parsed.secret, digest)
    assert not secret_matches(parsed.secret[:-1] + ("A" if parsed.secret[-1] != "A" else "B"), digest)
    assert not secret_matches(parsed.secret, None)
    assert parsed.secret not in digest.hex() and len(digest) == 32
    other, _ = mint_token(TokenKind.DEVICE, ORG, cred)
    assert other != token  # fresh randomness every time


@pytest.mark.parametrize("bad", ["", "vge_ak_", "vge_zz_" + "0" * 64 + "_" + "A" * 43,
                                 "vge_ak_" + "0" * 63 + "_" + "A" * 43, "Bearer x",
                                 "vge_ak_" + "0" * 64 + "_" + "A" * 42 + "!"])
def test_malformed_tokens_are_unauthenticated(bad):
    with pytest.raises(Unauthenticated):
        parse_token(bad)


def test_a_token_of_another_kind_is_refused_where_one_kind_is_expected():
    token, _ = mint_token(TokenKind.API_KEY, ORG, uuid.uuid4())
    with pytest.raises(Unauthenticated):
        parse_token(token, TokenKind.ENROLMENT)


def test_actors_of_credentials():
    key = uuid.uuid4()
    integration = api_key_actor(ORG, key, None)
    assert (integration.type, integration.role) == (ActorType.API_KEY, None)
    owner = api_key_actor(ORG, key, Role.OWNER)
    assert (owner.type, owner.role, owner.user_id) == (ActorType.USER, Role.OWNER, f"api_key:{key}")
    device = device_actor(ORG, key)
    assert (device.type, device.role, device.organization_id) == (ActorType.DEVICE, None, ORG)


@pytest.mark.parametrize("minter,role,allowed", [
    (Role.OWNER, Role.OWNER, True), (Role.ADMIN, Role.ADMIN, True), (Role.ADMIN, Role.OWNER, False),
    (Role.ADMIN, None, True), (Role.STAFF, Role.VIEWER, True), (Role.STAFF, Role.ADMIN, False),
])
def test_nobody_mints_a_key_more_powerful_than_themselves(minter, role, allowed):
    actor = Actor(user_id="u", organization_id=ORG, role=minter, type=ActorType.USER)
    if allowed:
        may_grant(actor, role)
    else:
        with pytest.raises(Forbidden):
            may_grant(actor, role)


def test_jwt_claims_make_a_user_actor_or_are_refused():
    actor = actor_from_claims({"sub": "u1", "org_id": str(ORG), "role": "staff"})
    assert (actor.type, actor.role, actor.organization_id) == (ActorType.USER, Role.STAFF, ORG)
    admin = actor_from_claims({"sub": "ops", "platform_admin": True})
    assert admin.is_platform_admin and admin.organization_id is None
    for claims in ({"org_id": str(ORG), "role": "staff"}, {"sub": "u", "org_id": str(ORG)},
                   {"sub": "u", "org_id": "nope", "role": "staff"}, {"sub": "u", "role": "king"},
                   {"sub": "u"}):
        with pytest.raises(Unauthenticated):
            actor_from_claims(claims)
    assert looks_like_jwt("a.b.c") and not looks_like_jwt("vge_ak_x.y.z")


def test_idempotency_fingerprint_and_keys():
    a = request_fingerprint("POST", "/v1/checkouts", b'{"a":1}')
    assert a == request_fingerprint("POST", "/v1/checkouts", b'{"a":1}')
    assert a != request_fingerprint("POST", "/v1/checkouts", b'{"a":2}')
    assert a != request_fingerprint("POST", "/v1/events", b'{"a":1}')
    assert check_key("order-42") == "order-42"
    for bad in ("", "a b", "x" * 201, "é"):
        with pytest.raises(InvalidInput):
            check_key(bad)
    assert keeps_response(201) and keeps_response(409) and not keeps_response(503)


def test_the_principal_acts_in_its_own_tenant_unless_a_platform_actor_names_one():
    mine = Principal(Actor(user_id="u", organization_id=ORG, role=Role.OWNER, type=ActorType.USER), "u")
    assert mine.tenant() == ORG and mine.tenant(str(ORG)) == ORG
    with pytest.raises(NotFound):
        mine.tenant(str(uuid.uuid4()))
    staff = Principal(Actor(user_id="s", organization_id=None, role=None, is_platform_staff=True,
                            type=ActorType.USER), "s")
    other = uuid.uuid4()
    assert staff.tenant(str(other)) == other
    with pytest.raises(InvalidInput):
        staff.tenant()
    with pytest.raises(InvalidInput):
        staff.tenant("not-a-uuid")
