"""Fault injection for the checkout saga: how tests make it fail or crash at a chosen step.

Two switches, both off in production:

* ``tok_fail_after_charge`` (the fake processor's token, design §7): the step right after the
  charge (posting to the ledger) fails, so the saga must compensate (refund, release).
* ``VGE_PAYMENTS_CRASH_AFTER=<step>`` (environment, test only): the process kills itself with
  SIGKILL right after ``<step>`` committed: ``charging`` (intent persisted, processor not yet
  called), ``charge`` (charge persisted, nothing booked), ``post`` (sale booked, no tickets).
  Without a crash switch the saga records the charge, books the sale, issues the tickets and
  queues the events in one transaction after the charge.
  ``charge`` and ``post`` make the saga persist those steps one by one, as it does when it
  resumes a saga found in ``charged`` or ``posted``, so that those states and their resumption
  stay tested. A restart must then resume the saga. Only honoured when ``VGE_ENVIRONMENT`` is
  not ``prod``.
"""

from __future__ import annotations

import os
import signal
from typing import Literal

from libs.log import get_logger
from services.payments.adapters.processor import TOKEN_FAIL_AFTER_CHARGE

__all__ = ["SagaFaults", "InjectedFailure", "CrashPoint", "CRASH_POINTS"]

log = get_logger(__name__)

CrashPoint = Literal["charging", "charge", "post"]
CRASH_POINTS: tuple[str, ...] = ("charging", "charge", "post")
_STEP_BY_STEP = frozenset({"charge", "post"})


class InjectedFailure(RuntimeError):
    """A failure a test asked for."""


class SagaFaults:
    """Decides whether the saga fails or crashes at a step. ``SagaFaults()`` does nothing."""

    def __init__(self, *, fail_after_charge_token: bool = False, crash_after: str | None = None):
        if crash_after is not None and crash_after not in CRASH_POINTS:
            raise ValueError(f"VGE_PAYMENTS_CRASH_AFTER must be one of {CRASH_POINTS}")
        self._fail_after_charge = fail_after_charge_token
        self._crash_after = crash_after

    @property
    def step_by_step(self) -> bool:
        """Whether the saga must commit ``charged`` and ``posted`` as steps of their own (a
        test crashes it between them)."""
        return self._crash_after in _STEP_BY_STEP

    def before_post(self, token: str | None) -> None:
        """Raise ``InjectedFailure`` if the buyer's token asks the step after the charge to fail."""
        if self._fail_after_charge and token == TOKEN_FAIL_AFTER_CHARGE:
            raise InjectedFailure("failure injected after the charge (tok_fail_after_charge)")

    def after(self, step: str) -> None:
        """SIGKILL this process if a test asked to crash right after ``step`` committed."""
        if step == self._crash_after:
            log.warning("crash_injected", after=step)
            os.kill(os.getpid(), signal.SIGKILL)
