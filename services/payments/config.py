"""Payments' own knobs, read from ``VGE_`` environment variables.

They belong in ``libs/settings.py`` (the one settings object); until they are there, this model
reads them, and a value set on ``Settings`` (once it has the field) or passed to ``build`` wins.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PaymentsSettings"]


class PaymentsSettings(BaseSettings):
    """Hold lifetime, sweep cadence, processor choice, platform fee and test-only faults."""

    model_config = SettingsConfigDict(env_prefix="VGE_", extra="ignore")

    hold_ttl_seconds: float = Field(default=900.0, gt=0, description="How long a checkout holds tickets.")
    hold_sweep_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often lapsed holds are released and idle sagas resumed."
    )
    payments_processor: Literal["fake"] = Field(
        default="fake", description="The payment processor adapter (only the fake one exists yet)."
    )
    platform_fee_bps: int = Field(
        default=0, ge=0, le=10_000, description="Platform fee booked on every sale, in basis points."
    )
    payments_crash_after: Literal["charging", "charge", "post"] | None = Field(
        default=None,
        description="TEST ONLY: SIGKILL the process right after this saga step commits.",
    )
