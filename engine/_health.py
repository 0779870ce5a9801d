"""``EngineHealth``: the engine's health, recomputed every tick, and the restart request.

The policy (``kvhandoff.sessions.HealthMonitor``) judges quarantines and progress; on top of
it the engine is unhealthy for good once its TP group broke (``TP_GROUP_FAILED``). A change
is logged (``health.change``); a restart request (unhealthy past the grace, or the group
broke) sets the event ``wait_restart_requested`` waits on and calls ``on_restart`` once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import attrs
from kvhandoff.sessions import Health, HealthMonitor, HealthPolicy

__all__ = ["TP_GROUP_FAILED", "EngineHealth"]

#: ``Health.reason`` when the engine's TP group itself broke.
TP_GROUP_FAILED = "tp_group_failed"


class EngineHealth:
    """Health of one engine."""

    def __init__(self, policy: HealthPolicy, now: float,
                 on_restart: Callable[[Health], None] | None) -> None:
        self._monitor = HealthMonitor.start(policy, now)
        self.snapshot = self._monitor.update(now, in_flight=0, quarantined=0)
        self._on_restart = on_restart
        self._group_broken = False
        #: Set once a restart is requested; made when the engine's loop starts.
        self.restart_event: anyio.Event | None = None

    @property
    def restart_requested(self) -> bool:
        return self._monitor.restart_requested or self._group_broken

    def update(self, now: float, *, in_flight: int, quarantined: int, completions: int,
               bytes_moved: int, group_broken: bool, log: Any | None) -> None:
        """Recompute from this tick's facts; ``log`` (a rank logger, or None when logging is
        off) gets a ``health.change`` line when the health changed."""
        monitor = self._monitor
        if completions or bytes_moved:
            monitor.record_progress(now, completions=completions, bytes_moved=bytes_moved)
        health = monitor.update(now, in_flight=in_flight, quarantined=quarantined)
        changed = monitor.changed
        self._group_broken = group_broken
        if group_broken:
            changed = changed or self.snapshot.reason != TP_GROUP_FAILED
            health = attrs.evolve(health, healthy=False, reason=TP_GROUP_FAILED)
        self.snapshot = health
        if not changed:
            return
        restart = self.restart_requested
        if log is not None:
            log.info(
                "health.change", healthy=health.healthy, quarantined=health.quarantined,
                quarantine_budget=health.quarantine_budget,
                seconds_since_progress=round(health.seconds_since_progress, 6),
                in_flight=health.in_flight, reason=health.reason, restart_requested=restart,
            )
        event = self.restart_event
        if restart and event is not None and not event.is_set():
            event.set()
            if self._on_restart is not None:
                self._on_restart(health)
