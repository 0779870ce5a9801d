"""Health policy: quarantine budget, progress deadline while busy, grace, recovery."""

from __future__ import annotations

import attrs
import pytest
from kvhandoff.sessions import (
    NO_PROGRESS,
    QUARANTINE_BUDGET_EXCEEDED,
    Health,
    HealthMonitor,
    HealthPolicy,
    InvalidArgumentError,
)

POLICY = HealthPolicy(quarantine_budget=2, progress_deadline_s=10.0, restart_grace_s=20.0)


def monitor() -> HealthMonitor:
    return HealthMonitor.start(POLICY, 0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("quarantine_budget", 0), ("quarantine_budget", 1.5), ("quarantine_budget", True),
     ("progress_deadline_s", 0.0), ("progress_deadline_s", float("nan")),
     ("restart_grace_s", -1.0)],
)
def test_health_policy_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        HealthPolicy(**{field: value})  # type: ignore[arg-type]
    assert info.value.name == field


def test_health_snapshot_has_exactly_the_design_fields_and_is_frozen() -> None:
    assert [f.name for f in attrs.fields(Health)] == [
        "healthy", "quarantined", "quarantine_budget", "seconds_since_progress", "in_flight",
        "reason",
    ]
    health = monitor().update(1.0, in_flight=0, quarantined=0)
    assert health == Health(True, 0, 2, 0.0, 0, None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        health.healthy = False  # type: ignore[misc]


def test_health_quarantine_over_budget_is_unhealthy_and_recovers() -> None:
    m = monitor()
    assert m.update(1.0, in_flight=2, quarantined=2).healthy  # at the budget: fine
    h = m.update(2.0, in_flight=3, quarantined=3)
    assert not h.healthy and h.reason == QUARANTINE_BUDGET_EXCEEDED and m.changed
    m.record_progress(3.0, completions=1)
    h = m.update(3.0, in_flight=2, quarantined=2)
    assert h.healthy and h.reason is None and m.changed and not m.restart_requested


def test_health_progress_deadline_counts_only_while_in_flight() -> None:
    m = monitor()
    assert m.update(100.0, in_flight=0, quarantined=0).seconds_since_progress == 0.0
    h = m.update(101.0, in_flight=1, quarantined=0)  # work begins: the clock starts here
    assert h.healthy and h.seconds_since_progress == 0.0
    assert m.update(111.0, in_flight=1, quarantined=0).healthy  # exactly the deadline
    assert not m.update(111.25, in_flight=1, quarantined=0).healthy
    h = m.update(111.5, in_flight=1, quarantined=0)
    assert not h.healthy and h.reason == NO_PROGRESS and h.seconds_since_progress == 10.5
    m.update(112.0, in_flight=0, quarantined=0)  # idle: the clock stops and health recovers
    h = m.update(200.0, in_flight=0, quarantined=0)
    assert h.healthy and h.seconds_since_progress == 0.0


def test_health_slow_but_moving_link_stays_healthy() -> None:
    m = monitor()
    m.update(0.0, in_flight=4, quarantined=0)
    for t in range(1, 100):
        m.record_progress(float(t), bytes_moved=4096)  # no completion for 99 s, bytes move
        h = m.update(float(t), in_flight=4, quarantined=0)
        assert h.healthy and h.seconds_since_progress == 0.0
    m.record_progress(100.0, completions=0, bytes_moved=0)  # nothing moved: not progress
    assert m.update(110.5, in_flight=4, quarantined=0).reason == NO_PROGRESS


def test_health_restart_only_after_grace_and_transient_window_recovers() -> None:
    m = monitor()
    m.update(0.0, in_flight=1, quarantined=0)
    assert not m.update(11.0, in_flight=1, quarantined=0).healthy  # unhealthy from t=11
    assert not m.restart_requested
    m.update(31.0, in_flight=1, quarantined=0)  # 20 s unhealthy: not longer than the grace
    assert not m.restart_requested
    m.record_progress(31.5, completions=1)  # transient: recovers
    assert m.update(31.5, in_flight=1, quarantined=0).healthy
    assert not m.restart_requested and m.unhealthy_since is None
    m.update(42.0, in_flight=1, quarantined=0)  # unhealthy again from 42
    m.update(62.0, in_flight=1, quarantined=0)
    assert not m.restart_requested
    m.update(62.5, in_flight=1, quarantined=0)
    assert m.restart_requested and m.changed
    m.update(63.0, in_flight=1, quarantined=0)
    assert m.restart_requested and not m.changed
    m.record_progress(64.0, completions=1)
    m.update(64.0, in_flight=0, quarantined=0)
    assert not m.restart_requested and m.changed


def test_health_routine_timeout_never_asks_for_restart() -> None:
    m = HealthMonitor.start(HealthPolicy(quarantine_budget=1, progress_deadline_s=5.0,
                                         restart_grace_s=0.0), 0.0)
    # One request times out and its handle stays pending while others keep completing.
    for t in range(1, 200):
        m.record_progress(float(t), completions=1)
        h = m.update(float(t), in_flight=3, quarantined=1)
        assert h.healthy and not m.restart_requested


def test_health_monitor_rejects_time_going_backwards_and_bad_counts() -> None:
    m = monitor()
    m.update(5.0, in_flight=0, quarantined=0)
    with pytest.raises(InvalidArgumentError):
        m.update(4.0, in_flight=0, quarantined=0)
    with pytest.raises(InvalidArgumentError):
        m.update(6.0, in_flight=-1, quarantined=0)
    with pytest.raises(InvalidArgumentError):
        m.record_progress(6.0, bytes_moved=-5)
