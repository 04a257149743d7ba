"""The actor: who is doing something, in exactly the six fields of the design (§3)."""

from __future__ import annotations

from enum import StrEnum
from uuid import UUID

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Actor", "ActorType", "Role", "SYSTEM_ACTOR_ID"]


class Role(StrEnum):
    """A user's role inside their organization."""

    OWNER = "owner"
    ADMIN = "admin"
    STAFF = "staff"
    VIEWER = "viewer"
    SCANNER_ONLY = "scanner_only"


class ActorType(StrEnum):
    """What kind of principal acts."""

    USER = "user"
    SYSTEM = "system"
    DEVICE = "device"
    API_KEY = "api_key"


SYSTEM_ACTOR_ID = "system"


class Actor(BaseModel):
    """Who acts. Built by the gateway from a credential, never from a request body.

    ``user_id`` is the principal's id (a user, device, API key or system component).
    Devices, systems and API keys carry no role; anyone but a platform actor belongs to an
    organization.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: str
    organization_id: UUID | None
    role: Role | None
    is_platform_admin: bool = False
    is_platform_staff: bool = False
    type: ActorType

    @model_validator(mode="after")
    def _check_shape(self) -> "Actor":
        if not self.user_id:
            raise ValueError("actor needs a user_id")
        if self.type is not ActorType.USER and self.role is not None:
            raise ValueError(f"a {self.type.value} actor has no role")
        if self.type is ActorType.USER and self.organization_id is not None and self.role is None:
            raise ValueError("a user acting in an organization needs a role")
        is_platform = self.is_platform_admin or self.is_platform_staff
        if self.organization_id is None and not is_platform and self.type is not ActorType.SYSTEM:
            raise ValueError("a non-platform actor must belong to an organization")
        if is_platform and self.type is not ActorType.USER:
            raise ValueError("only users can be platform admin or staff")
        return self

    @classmethod
    def system(cls, component: str, organization_id: UUID | None = None) -> "Actor":
        """The actor of work a service does on its own (relays, jobs, sagas)."""
        return cls(
            user_id=f"{SYSTEM_ACTOR_ID}:{component}",
            organization_id=organization_id,
            role=None,
            type=ActorType.SYSTEM,
        )
