"""The command router's replay guard: a signed context is accepted once while it is valid."""

from __future__ import annotations

from libs.commands import _ReplayGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_context_is_accepted_once_while_valid():
    clock = Clock()
    guard = _ReplayGuard(clock)
    assert guard.first_time("m1", clock.now + 30)
    assert not guard.first_time("m1", clock.now + 30)
    clock.now += 29
    assert not guard.first_time("m1", clock.now + 30)


def test_contexts_are_forgotten_as_they_expire_whatever_order_they_came_in():
    clock = Clock()
    guard = _ReplayGuard(clock)
    # long-lived and short-lived contexts mixed (device credentials, gateway calls)
    for n in range(1_000):
        assert guard.first_time(f"m{n}", clock.now + (600 if n % 2 else 30))
    clock.now += 31
    assert guard.first_time("late", clock.now + 30)
    # the 500 short-lived ones are gone at once (not at a later sweep); the others stay refused
    assert len(guard) == 501
    assert not guard.first_time("m1", clock.now + 600)
    clock.now += 600
    assert guard.first_time("again", clock.now + 30) and len(guard) == 1
