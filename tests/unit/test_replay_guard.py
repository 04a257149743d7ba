"""The command router's replay guard: a signed context is accepted once while it is valid."""

from __future__ import annotations

from libs.commands import _ReplayGuard


def _guard_at_1000() -> tuple[list[float], _ReplayGuard]:
    now = [1_000.0]
    return now, _ReplayGuard(lambda: now[0])


def test_a_context_is_accepted_once_while_valid():
    now, guard = _guard_at_1000()
    assert guard.first_time("m1", now[0] + 30)
    assert not guard.first_time("m1", now[0] + 30)
    now[0] += 29
    assert not guard.first_time("m1", now[0] + 30)


def test_contexts_are_forgotten_as_they_expire_whatever_order_they_came_in():
    now, guard = _guard_at_1000()
    # long-lived and short-lived contexts mixed (device credentials, gateway calls)
    for n in range(1_000):
        assert guard.first_time(f"m{n}", now[0] + (600 if n % 2 else 30))
    now[0] += 31
    assert guard.first_time("late", now[0] + 30)
    # the 500 short-lived ones are gone at once (not at a later sweep); the others stay refused
    assert len(guard) == 501
    assert not guard.first_time("m1", now[0] + 600)
    now[0] += 600
    assert guard.first_time("again", now[0] + 30) and len(guard) == 1
