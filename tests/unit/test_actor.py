"""The six-field actor (design §3): which shapes are valid."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from libs.actor import SYSTEM_ACTOR_ID, Actor, ActorType, Role

pytestmark = pytest.mark.unit

ORG = UUID("0190a3c4-0000-7000-8000-000000000001")


def test_exactly_the_six_fields_of_the_design() -> None:
    assert set(Actor.model_fields) == {
        "user_id",
        "organization_id",
        "role",
        "is_platform_admin",
        "is_platform_staff",
        "type",
    }


@pytest.mark.parametrize("role", list(Role))
def test_user_in_an_organization_with_any_role(role: Role) -> None:
    actor = Actor(user_id="u1", organization_id=ORG, role=role, type=ActorType.USER)
    assert actor.role is role
    assert not actor.is_platform_admin and not actor.is_platform_staff


@pytest.mark.parametrize("actor_type", [ActorType.DEVICE, ActorType.API_KEY, ActorType.SYSTEM])
def test_non_user_actor_in_an_organization_without_role(actor_type: ActorType) -> None:
    actor = Actor(user_id="p1", organization_id=ORG, role=None, type=actor_type)
    assert actor.role is None and actor.organization_id == ORG


@pytest.mark.parametrize("flag", ["is_platform_admin", "is_platform_staff"])
def test_platform_user_without_organization(flag: str) -> None:
    actor = Actor(
        user_id="ops", organization_id=None, role=None, type=ActorType.USER, **{flag: True}
    )
    assert getattr(actor, flag) is True


def test_platform_user_who_also_belongs_to_an_organization() -> None:
    actor = Actor(
        user_id="ops",
        organization_id=ORG,
        role=Role.OWNER,
        type=ActorType.USER,
        is_platform_staff=True,
    )
    assert actor.organization_id == ORG


def test_system_helper() -> None:
    actor = Actor.system("payments.saga", ORG)
    assert actor.type is ActorType.SYSTEM
    assert actor.user_id == f"{SYSTEM_ACTOR_ID}:payments.saga"
    assert actor.organization_id == ORG and actor.role is None
    # A system job may also run outside any tenant (e.g. a relay over all tenants).
    assert Actor.system("relay").organization_id is None


@pytest.mark.parametrize("actor_type", [ActorType.DEVICE, ActorType.SYSTEM, ActorType.API_KEY])
@pytest.mark.parametrize("role", [Role.OWNER, Role.SCANNER_ONLY])
def test_device_system_and_api_key_have_no_role(actor_type: ActorType, role: Role) -> None:
    with pytest.raises(ValidationError, match="has no role"):
        Actor(user_id="p1", organization_id=ORG, role=role, type=actor_type)


@pytest.mark.parametrize(
    ("actor_type", "role"),
    [
        (ActorType.USER, Role.OWNER),
        (ActorType.USER, None),
        (ActorType.DEVICE, None),
        (ActorType.API_KEY, None),
    ],
)
def test_non_platform_actor_needs_an_organization(actor_type: ActorType, role: Role | None) -> None:
    with pytest.raises(ValidationError, match="must belong to an organization"):
        Actor(user_id="p1", organization_id=None, role=role, type=actor_type)


def test_user_in_an_organization_needs_a_role() -> None:
    with pytest.raises(ValidationError, match="needs a role"):
        Actor(user_id="u1", organization_id=ORG, role=None, type=ActorType.USER)


@pytest.mark.parametrize("actor_type", [ActorType.DEVICE, ActorType.SYSTEM, ActorType.API_KEY])
@pytest.mark.parametrize("flag", ["is_platform_admin", "is_platform_staff"])
def test_only_users_are_platform_actors(actor_type: ActorType, flag: str) -> None:
    with pytest.raises(ValidationError, match="only users"):
        Actor(user_id="p1", organization_id=ORG, role=None, type=actor_type, **{flag: True})


def test_empty_user_id_is_refused() -> None:
    with pytest.raises(ValidationError, match="user_id"):
        Actor(user_id="", organization_id=ORG, role=Role.STAFF, type=ActorType.USER)


def test_unknown_role_type_and_extra_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        Actor.model_validate(
            {"user_id": "u1", "organization_id": ORG, "role": "superuser", "type": "user"}
        )
    with pytest.raises(ValidationError):
        Actor(user_id="u1", organization_id=ORG, role=None, type="robot")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Actor.model_validate(
            {"user_id": "u1", "organization_id": str(ORG), "role": "staff", "type": "user",
             "permissions": ["*"]}
        )  # fmt: skip


def test_frozen_and_json_round_trip() -> None:
    actor = Actor(user_id="u1", organization_id=uuid4(), role=Role.VIEWER, type=ActorType.USER)
    with pytest.raises(ValidationError):
        actor.role = Role.OWNER  # type: ignore[misc]
    assert Actor.model_validate_json(actor.model_dump_json()) == actor
