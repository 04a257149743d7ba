"""The one policy table (design §4.2): which actor may do which action on which resource.

Checked in the gateway and again in the owning service. ``can`` is pure; ``authorize`` turns a
denial into the right error: another tenant's resource is ``not_found`` (design §4.1: no
existence leak), anything else the actor may not do is ``forbidden``.

How a decision is made, in order:

1. a platform admin may do everything, in any tenant and at platform level;
2. a platform staff member may do the actions marked ``platform_staff`` (reads) in any tenant;
3. a platform-level resource (``organization_id`` None) admits nobody else;
4. the actor must belong to the resource's tenant;
5. inside the tenant, a user needs one of the action's roles; a device, API key or system actor
   needs its type listed for the action.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from uuid import UUID

from libs.actor import Actor, ActorType, Role
from libs.errors import Forbidden, NotFound

__all__ = ["Action", "Resource", "Rule", "POLICY", "can", "authorize"]


class Action(StrEnum):
    """Everything the policy knows how to allow. Anything else is denied."""

    EVENT_CREATE = "event.create"
    EVENT_READ = "event.read"
    DEVICE_MANAGE = "device.manage"
    API_KEY_MANAGE = "api_key.manage"
    SCAN_SUBMIT = "scan.submit"
    SCAN_SYNC = "scan.sync"
    OCCUPANCY_READ = "occupancy.read"
    CHECKOUT_CREATE = "checkout.create"
    CHECKOUT_COMPLETE = "checkout.complete"
    CHECKOUT_READ = "checkout.read"
    CHECKOUT_REFUND = "checkout.refund"
    LEDGER_READ = "ledger.read"
    AUDIT_READ = "audit.read"
    AUDIT_VERIFY = "audit.verify"
    TENANT_CREATE = "tenant.create"


@dataclass(frozen=True, slots=True)
class Resource:
    """What an action is applied to: its type, owning tenant (None: platform level) and id."""

    type: str
    organization_id: UUID | None
    id: str | None = None

    def __post_init__(self) -> None:
        # Accept a tenant id given as text, so a str/UUID mismatch can never decide a check.
        if isinstance(self.organization_id, str):
            object.__setattr__(self, "organization_id", UUID(self.organization_id))


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: who may do an action inside a tenant.

    ``roles``: user roles allowed in their own tenant. ``types``: non-user actor types allowed in
    their own tenant. ``platform_staff``: platform staff may do it in any tenant (reads only).
    Platform admins are allowed everything and need no column.
    """

    roles: frozenset[Role]
    types: frozenset[ActorType]
    platform_staff: bool = False


def _rule(roles: str = "", types: str = "", *, platform_staff: bool = False) -> Rule:
    # Space-separated names keep the table below readable as a table.
    return Rule(
        roles=frozenset(Role(r) for r in roles.split()),
        types=frozenset(ActorType(t) for t in types.split()),
        platform_staff=platform_staff,
    )


_ADMINS = "owner admin"
_STAFF = f"{_ADMINS} staff"
_SCANNERS = f"{_STAFF} scanner_only"
_EVERYONE = f"{_SCANNERS} viewer"

# API keys carry no role (design §3), so their reach is fixed here: the integration-partner set
# (a box office or shop selling tickets and reading the books). They cannot manage credentials
# (devices, API keys: a leaked key must not mint more keys), cannot sync offline device batches
# (that is a device's job) and cannot read or verify the audit log (the owner's oversight tool).
# System actors are the services' own jobs and may do everything inside the tenant they name;
# creating tenants is for platform admins only.
POLICY: Final[dict[Action, Rule]] = {
    #                          user roles       other actor types               platform staff
    Action.EVENT_CREATE:      _rule(_ADMINS,    "api_key system"),
    Action.EVENT_READ:        _rule(_STAFF + " viewer", "api_key system", platform_staff=True),
    Action.DEVICE_MANAGE:     _rule(_ADMINS,    "system"),
    Action.API_KEY_MANAGE:    _rule(_ADMINS,    "system"),
    Action.SCAN_SUBMIT:       _rule(_SCANNERS,  "device api_key system"),
    Action.SCAN_SYNC:         _rule(_SCANNERS,  "device system"),
    Action.OCCUPANCY_READ:    _rule(_EVERYONE,  "device api_key system", platform_staff=True),
    Action.CHECKOUT_CREATE:   _rule(_STAFF,     "api_key system"),
    Action.CHECKOUT_COMPLETE: _rule(_STAFF,     "api_key system"),
    Action.CHECKOUT_READ:     _rule(_STAFF,     "api_key system"),
    Action.CHECKOUT_REFUND:   _rule(_ADMINS,    "api_key system"),
    Action.LEDGER_READ:       _rule(_ADMINS,    "api_key system", platform_staff=True),
    Action.AUDIT_READ:        _rule(_ADMINS,    "system"),  # issue 5: owner/admin or platform admin
    Action.AUDIT_VERIFY:      _rule(_ADMINS,    "system"),
    Action.TENANT_CREATE:     _rule(),  # platform admins only
}  # fmt: skip

# Every action has a row: a missing one would silently deny (or, worse, tempt a default).
if set(POLICY) != set(Action):  # pragma: no cover - a programming error, caught at import
    raise RuntimeError(f"POLICY lacks rows for {sorted(set(Action) - set(POLICY))}")


def _sees_tenant(actor: Actor, organization_id: UUID | None) -> bool:
    """Whether the actor may know that a record of this tenant exists."""
    if actor.is_platform_admin or actor.is_platform_staff or organization_id is None:
        return True
    return actor.organization_id == organization_id


def can(actor: Actor, action: Action | str, resource: Resource) -> bool:
    """Whether ``actor`` may do ``action`` on ``resource``. Pure; unknown actions are denied."""
    rule = POLICY.get(action)  # type: ignore[call-overload]
    if rule is None:
        return False
    if actor.is_platform_admin:
        return True
    if actor.is_platform_staff and rule.platform_staff:
        return True
    if resource.organization_id is None:
        return False
    if actor.organization_id != resource.organization_id:
        return False
    if actor.type is ActorType.USER:
        return actor.role is not None and actor.role in rule.roles
    return actor.type in rule.types


def authorize(actor: Actor, action: Action | str, resource: Resource) -> None:
    """Raise unless ``can(actor, action, resource)``.

    ``NotFound`` when the resource is in a tenant the actor cannot see (checked first, so a denial
    never confirms that another tenant's record exists); ``Forbidden`` otherwise.
    """
    if can(actor, action, resource):
        return
    what = f"{resource.type} {resource.id}" if resource.id else resource.type
    if not _sees_tenant(actor, resource.organization_id):
        raise NotFound(f"{what} not found")
    raise Forbidden(
        f"{actor.type.value} actor may not {action} on {resource.type}", action=str(action)
    )
