"""The policy table: who may do what, where (design §4)."""

from __future__ import annotations

from uuid import UUID

import pytest

from libs.actor import Actor, ActorType, Role
from libs.errors import ErrorCode, Forbidden, NotFound
from libs.policy import POLICY, Action, Resource, authorize, can

pytestmark = pytest.mark.unit

ORG_A = UUID("0190a3c4-0000-7000-8000-00000000000a")
ORG_B = UUID("0190a3c4-0000-7000-8000-00000000000b")


def user(role: Role, org: UUID = ORG_A) -> Actor:
    return Actor(user_id=f"u-{role}", organization_id=org, role=role, type=ActorType.USER)


def principal(actor_type: ActorType, org: UUID | None = ORG_A) -> Actor:
    return Actor(user_id=f"p-{actor_type}", organization_id=org, role=None, type=actor_type)


ACTORS: dict[str, Actor] = {
    "owner": user(Role.OWNER),
    "admin": user(Role.ADMIN),
    "staff": user(Role.STAFF),
    "viewer": user(Role.VIEWER),
    "scanner_only": user(Role.SCANNER_ONLY),
    "device": principal(ActorType.DEVICE),
    "api_key": principal(ActorType.API_KEY),
    "system": Actor.system("payments.saga", ORG_A),
}
PLATFORM_ADMIN = Actor(
    user_id="ops", organization_id=None, role=None, type=ActorType.USER, is_platform_admin=True
)
PLATFORM_STAFF = Actor(
    user_id="support", organization_id=None, role=None, type=ActorType.USER, is_platform_staff=True
)

ADMINS = {"owner", "admin"}
# The expected table, spelled out independently of libs.policy: who may do it in their own tenant.
EXPECTED: dict[Action, set[str]] = {
    Action.EVENT_CREATE: ADMINS | {"api_key", "system"},
    Action.EVENT_READ: ADMINS | {"staff", "viewer", "api_key", "system"},
    Action.DEVICE_MANAGE: ADMINS | {"system"},
    Action.API_KEY_MANAGE: ADMINS | {"system"},
    Action.SCAN_SUBMIT: ADMINS | {"staff", "scanner_only", "device", "api_key", "system"},
    Action.SCAN_SYNC: ADMINS | {"staff", "scanner_only", "device", "system"},
    Action.OCCUPANCY_READ: set(ACTORS),
    Action.CHECKOUT_CREATE: ADMINS | {"staff", "api_key", "system"},
    Action.CHECKOUT_COMPLETE: ADMINS | {"staff", "api_key", "system"},
    Action.CHECKOUT_READ: ADMINS | {"staff", "api_key", "system"},
    Action.CHECKOUT_REFUND: ADMINS | {"api_key", "system"},
    Action.LEDGER_READ: ADMINS | {"api_key", "system"},
    Action.AUDIT_READ: ADMINS | {"system"},
    Action.AUDIT_VERIFY: ADMINS | {"system"},
    Action.TENANT_CREATE: set(),
}
PLATFORM_STAFF_READS = {
    Action.EVENT_READ,
    Action.OCCUPANCY_READ,
    Action.LEDGER_READ,
}  # not the audit log: issue 5 reserves it for owner/admin and platform admins


def in_tenant(org: UUID | None = ORG_A) -> Resource:
    return Resource(type="event", organization_id=org, id="r-1")


def test_every_action_has_a_row() -> None:
    assert set(POLICY) == set(Action) == set(EXPECTED)
    assert {a.value for a in Action} >= {
        "event.create", "event.read", "device.manage", "api_key.manage", "scan.submit",
        "scan.sync", "occupancy.read", "checkout.create", "checkout.complete", "checkout.refund",
        "ledger.read", "audit.read", "audit.verify", "tenant.create",
    }  # fmt: skip


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("name", list(ACTORS))
def test_table_in_own_tenant(name: str, action: Action) -> None:
    actor = ACTORS[name]
    allowed = name in EXPECTED[action]
    assert can(actor, action, in_tenant()) is allowed
    if allowed:
        authorize(actor, action, in_tenant())
    else:
        with pytest.raises(Forbidden) as info:
            authorize(actor, action, in_tenant())
        assert info.value.code is ErrorCode.FORBIDDEN


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("name", list(ACTORS))
def test_another_tenant_is_not_found_never_forbidden(name: str, action: Action) -> None:
    actor = ACTORS[name]
    resource = in_tenant(ORG_B)
    assert can(actor, action, resource) is False
    # Not found even for actions the actor could never do: the answer must not depend on
    # whether the record exists or what the actor's role is.
    with pytest.raises(NotFound) as info:
        authorize(actor, action, resource)
    assert info.value.code is ErrorCode.NOT_FOUND
    assert "r-1" in info.value.detail and str(ORG_B) not in info.value.detail


@pytest.mark.parametrize("action", list(Action))
def test_platform_admin_may_do_everything_anywhere(action: Action) -> None:
    for org in (ORG_A, ORG_B, None):
        assert can(PLATFORM_ADMIN, action, in_tenant(org))
        authorize(PLATFORM_ADMIN, action, in_tenant(org))


def test_platform_admin_who_belongs_to_a_tenant_still_reaches_others() -> None:
    actor = Actor(
        user_id="ops", organization_id=ORG_A, role=Role.VIEWER, type=ActorType.USER,
        is_platform_admin=True,
    )  # fmt: skip
    assert can(actor, Action.CHECKOUT_REFUND, in_tenant(ORG_B))
    assert can(actor, Action.TENANT_CREATE, Resource(type="organization", organization_id=None))


@pytest.mark.parametrize("action", list(Action))
def test_platform_staff_read_only_in_any_tenant(action: Action) -> None:
    for org in (ORG_A, ORG_B):
        if action in PLATFORM_STAFF_READS:
            assert can(PLATFORM_STAFF, action, in_tenant(org))
            authorize(PLATFORM_STAFF, action, in_tenant(org))
        else:
            assert not can(PLATFORM_STAFF, action, in_tenant(org))
            # Platform staff can see every tenant, so hiding the record would be pointless:
            # a mutation they may not do is forbidden.
            with pytest.raises(Forbidden):
                authorize(PLATFORM_STAFF, action, in_tenant(org))


def test_platform_staff_with_own_tenant_role() -> None:
    actor = Actor(
        user_id="s", organization_id=ORG_A, role=Role.OWNER, type=ActorType.USER,
        is_platform_staff=True,
    )  # fmt: skip
    assert can(actor, Action.CHECKOUT_REFUND, in_tenant(ORG_A))  # as owner of A
    assert not can(actor, Action.CHECKOUT_REFUND, in_tenant(ORG_B))  # only reads elsewhere
    assert can(actor, Action.LEDGER_READ, in_tenant(ORG_B))


def test_platform_level_resources_admit_only_platform_actors() -> None:
    platform = Resource(type="organization", organization_id=None)
    assert can(PLATFORM_ADMIN, Action.TENANT_CREATE, platform)
    assert not can(PLATFORM_STAFF, Action.TENANT_CREATE, platform)
    with pytest.raises(Forbidden):
        authorize(PLATFORM_STAFF, Action.TENANT_CREATE, platform)
    for name, actor in ACTORS.items():
        for action in Action:
            assert not can(actor, action, platform), (name, action)
        # Nothing to hide about a platform-level resource: the denial is forbidden.
        with pytest.raises(Forbidden):
            authorize(actor, Action.TENANT_CREATE, platform)
    assert not can(ACTORS["system"], Action.EVENT_READ, Resource("event", None))


def test_system_actor_does_everything_inside_its_tenant_but_create_tenants() -> None:
    system = ACTORS["system"]
    for action in Action:
        assert can(system, action, in_tenant()) is (action is not Action.TENANT_CREATE)
    # A system job must name the tenant it works in.
    tenantless = Actor.system("relay")
    assert not can(tenantless, Action.EVENT_READ, in_tenant())
    with pytest.raises(NotFound):
        authorize(tenantless, Action.EVENT_READ, in_tenant())


def test_device_cannot_refund_or_manage() -> None:
    device = ACTORS["device"]
    for action in (Action.CHECKOUT_REFUND, Action.DEVICE_MANAGE, Action.EVENT_CREATE):
        with pytest.raises(Forbidden, match="device actor may not"):
            authorize(device, action, in_tenant())
    assert can(device, Action.SCAN_SUBMIT, in_tenant())
    assert can(device, Action.SCAN_SYNC, in_tenant())


def test_api_key_cannot_mint_credentials_or_read_audit() -> None:
    key = ACTORS["api_key"]
    denied = (Action.API_KEY_MANAGE, Action.DEVICE_MANAGE, Action.AUDIT_READ, Action.TENANT_CREATE)
    for action in denied:
        assert not can(key, action, in_tenant()), action


def test_actions_as_plain_strings_and_unknown_actions() -> None:
    owner = ACTORS["owner"]
    assert can(owner, "event.create", in_tenant())
    assert not can(owner, "event.delete", in_tenant())
    assert not can(PLATFORM_ADMIN, "everything", in_tenant())
    with pytest.raises(Forbidden):
        authorize(owner, "event.delete", in_tenant())


def test_resource_normalises_a_text_tenant_id() -> None:
    resource = Resource(type="event", organization_id=str(ORG_A))  # type: ignore[arg-type]
    assert resource.organization_id == ORG_A and resource.id is None
    assert can(ACTORS["owner"], Action.EVENT_CREATE, resource)
    with pytest.raises(AttributeError):
        resource.organization_id = ORG_B  # type: ignore[misc]


def test_denials_carry_the_action() -> None:
    with pytest.raises(Forbidden) as info:
        authorize(ACTORS["viewer"], Action.LEDGER_READ, in_tenant())
    assert info.value.extra == {"action": "ledger.read"}
    assert "ledger.read" in info.value.detail
