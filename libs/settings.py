"""The one settings object of the platform (environment variables with the ``VGE_`` prefix)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings", "nats_servers"]


class Settings(BaseSettings):
    """Every knob of every service. Unset server URLs mean "start real servers locally"."""

    model_config = SettingsConfigDict(env_prefix="VGE_", extra="ignore")

    environment: Literal["dev", "test", "prod"] = "dev"
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    nats_url: str | None = Field(
        default=None,
        description="One NATS server, or a cluster's servers comma-separated "
        "(nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222): a process then starts while "
        "any one of them answers, not only the first.",
    )
    # this process's NATS login (deploy/nats: one user per service; `vge up` sets both)
    nats_user: str | None = None
    nats_password: str | None = None
    database_url: str | None = Field(
        default=None, description="Admin URL: runs migrations and creates the service roles."
    )
    service_database_url: str | None = Field(
        default=None,
        description="The service's own login (a role that does not own its tables). "
        "Derived from database_url and db_role_password when unset.",
    )
    db_role_password: str = "vge-dev-only"
    redis_url: str | None = None

    data_dir: Path = Path(".vge")
    http_host: str = "127.0.0.1"  # 0.0.0.0 in containers
    gateway_port: int = 8080
    health_port: int = 0  # 0: pick a free port (logged at startup)

    # Ed25519 keys of the signed command context, base64 (raw 32 bytes).
    context_private_key: str | None = None  # gateway only
    context_public_keys: str | None = None  # comma-separated: allows key rotation
    context_ttl_seconds: float = 30.0

    events_duplicate_window_seconds: float = 120.0
    stream_replicas: int = Field(
        default=1, ge=1, le=5,
        description="Servers of a NATS cluster that keep each stream (VGE_EVENTS and the dead letters): "
        "3 on deploy/nats/nats-cluster.conf, 1 on a single server (which refuses more).",
    )
    consumer_max_deliver: int = 5
    consumer_backoff_seconds: str = "0.2,1,5,15"
    outbox_batch_size: int = 500
    outbox_poll_seconds: float = Field(
        default=1.0, gt=0,
        description="How often the outbox relay looks for unpublished rows when nothing woke it "
        "(a commit normally wakes it at once).",
    )
    gc_thresholds: tuple[int, int, int] = Field(
        default=(5_000, 20, 100),
        description="Python's garbage-collector thresholds for a service process (gc.set_threshold).",
    )
    stop_timeout_seconds: float = Field(
        default=25.0, gt=0,
        description="Longest a service spends stopping on SIGTERM before it exits anyway "
        "(below an orchestrator's usual 30 s grace period).",
    )
    redis_timeout_seconds: float = 0.1
    command_timeout_seconds: float = 2.0

    # payments
    hold_ttl_seconds: float = Field(default=900.0, gt=0, description="How long a checkout holds tickets.")
    hold_sweep_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often lapsed holds are released and idle sagas resumed."
    )
    payments_processor: Literal["fake"] = "fake"  # only the fake adapter exists yet
    platform_fee_bps: int = Field(default=0, ge=0, le=10_000, description="Fee booked per sale.")
    payments_crash_after: Literal["charging", "charge", "post"] | None = Field(
        default=None, description="TEST ONLY: SIGKILL payments right after this saga step commits."
    )

    # gateway
    gateway_public_url: str | None = Field(
        default=None, description="The API address devices use (in enrolment payloads); "
        "default: http://127.0.0.1:<gateway_port>.",
    )
    jwt_issuer: str | None = Field(default=None, description="Issuer of user JWTs; unset: no JWTs.")
    jwt_audience: str | None = None
    jwt_hs256_secret: str | None = Field(default=None, description="Local runs: HS256 shared key.")
    jwt_public_key: str | None = Field(default=None, description="RS256: the issuer's PEM key.")
    jwt_jwks_url: str | None = Field(default=None, description="RS256: the issuer's JWKS address.")
    rate_limit_per_second: int = Field(
        default=300, ge=1, description="Requests one credential may make per second."
    )
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body (an offline batch)."
    )
    enrolment_ttl_seconds: float = Field(default=86_400.0, gt=0)
    credential_cache_seconds: float = Field(
        default=10.0, ge=0,
        description="How long a verified credential is trusted without a lookup; a revocation "
        "is broadcast to every gateway replica at once, this only bounds a lost broadcast.",
    )
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0)

    @property
    def consumer_backoff(self) -> list[float]:
        """Redelivery delays of a JetStream consumer, one per failed attempt."""
        return [float(x) for x in self.consumer_backoff_seconds.split(",") if x.strip()]


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def nats_servers(url: str) -> list[str]:
    """The servers of a ``nats_url`` (comma-separated for a cluster), for ``nats.connect``: it
    takes a list, and reads a string as one server."""
    return [u.strip() for u in url.split(",") if u.strip()]
