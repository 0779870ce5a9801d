"""Engine health: the policy, the frozen snapshot and the monitor that applies the policy.

The engine is unhealthy when

* more sessions are quarantined than ``quarantine_budget`` allows (reason
  ``quarantine_budget_exceeded``), or
* sessions are in flight and nothing has progressed for longer than
  ``progress_deadline_s`` (reason ``no_progress``).

Progress is any handle reaching a final state *or* bytes moving, so a slow link that still
moves data never trips the progress deadline (slow is not dead); and the progress clock only
runs while something is in flight, so an idle engine is not "stuck". A quarantined session's
handle finishing is progress too, which is how a slow link drains its quarantine.

Health recovers by itself when the condition clears. Only a condition that lasts longer than
``restart_grace_s`` asks the host to restart; a single routine per-request timeout never does
(the budget is at least 1, so one quarantine cannot make the engine unhealthy).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from kvhandoff.sessions.errors import InvalidArgumentError

QUARANTINE_BUDGET_EXCEEDED = "quarantine_budget_exceeded"
NO_PROGRESS = "no_progress"


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise InvalidArgumentError(attribute.name, value, "a positive finite number of seconds")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value < 0):
        raise InvalidArgumentError(attribute.name, value, "a finite number of seconds >= 0")


def _budget(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(attribute.name, value, "an int >= 1")


@attrs.frozen
class HealthPolicy:
    """When the engine counts as unhealthy, and how long before it asks for a restart.

    Defaults follow the field (16 quarantined sessions, 60 s without progress, a grace of
    twice the progress deadline). Bad values raise ``InvalidArgumentError`` here.
    """

    quarantine_budget: int = attrs.field(default=16, validator=_budget)
    progress_deadline_s: float = attrs.field(default=60.0, validator=_positive)
    restart_grace_s: float = attrs.field(default=120.0, validator=_non_negative)


@attrs.frozen
class Health:
    """A snapshot of engine health (the fields docs/design.md names). ``reason`` is None when
    healthy, else ``"quarantine_budget_exceeded"`` or ``"no_progress"``."""

    healthy: bool
    quarantined: int
    quarantine_budget: int
    seconds_since_progress: float
    in_flight: int
    reason: str | None


def _check_now(value: float) -> float:
    if type(value) is float and math.isfinite(value):  # the usual case, checked first
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError("now", value, "a finite number of seconds")
    return float(value)


def _check_count(name: str, value: int) -> int:
    if type(value) is int and value >= 0:  # the usual case (never a bool), checked first
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(name, value, "an int >= 0")
    return value


@attrs.define
class HealthMonitor:
    """Applies a ``HealthPolicy`` to what the engine reports; sans-I/O (time is passed in).

    Each tick: ``record_progress`` for what moved, then ``update(now, in_flight=...,
    quarantined=...)``, which returns the snapshot. ``restart_requested`` is True while the
    engine has been unhealthy for longer than the grace (it clears on recovery);
    ``changed`` says whether the last ``update`` changed ``healthy``, ``reason`` or
    ``restart_requested`` (when to log ``health.change``).
    """

    policy: HealthPolicy
    _last_progress: float
    _busy: bool = False
    _busy_since: float = 0.0
    _unhealthy_since: float | None = None
    _last_now: float = attrs.field(default=-math.inf)
    health: Health | None = None
    restart_requested: bool = False
    changed: bool = False

    @classmethod
    def start(cls, policy: HealthPolicy, now: float) -> HealthMonitor:
        """A monitor whose progress clock starts at ``now``."""
        if not isinstance(policy, HealthPolicy):
            raise InvalidArgumentError("policy", policy, "a HealthPolicy")
        now = _check_now(now)
        return cls(policy=policy, last_progress=now, busy_since=now, last_now=now)

    @property
    def unhealthy_since(self) -> float | None:
        return self._unhealthy_since

    def _advance(self, now: float) -> float:
        now = _check_now(now)
        if now < self._last_now:
            raise InvalidArgumentError("now", now, f"a time not before {self._last_now}")
        self._last_now = now
        return now

    def record_progress(self, now: float, *, completions: int = 0, bytes_moved: int = 0) -> None:
        """Report what moved since the last call: handles that reached a final state
        (``completions``) and payload bytes moved. Zero of both is not progress."""
        now = self._advance(now)
        if _check_count("completions", completions) or _check_count("bytes_moved", bytes_moved):
            self._last_progress = now

    def seconds_since_progress(self, now: float) -> float:
        """Seconds the progress clock has run: 0 while idle; while busy, since the later of
        the last progress and the moment work began."""
        if not self._busy:
            return 0.0
        return max(0.0, now - max(self._last_progress, self._busy_since))

    def update(self, now: float, *, in_flight: int, quarantined: int) -> Health:
        """The health at ``now`` given the current counts (sessions with a posted operation
        not yet settled, and quarantined sessions)."""
        now = self._advance(now)
        in_flight = _check_count("in_flight", in_flight)
        quarantined = _check_count("quarantined", quarantined)
        busy = in_flight > 0
        if busy and not self._busy:
            self._busy_since = now  # the progress clock counts only while work is pending
        self._busy = busy
        since = self.seconds_since_progress(now)
        policy = self.policy
        reason: str | None = None
        if busy and since > policy.progress_deadline_s:
            reason = NO_PROGRESS
        elif quarantined > policy.quarantine_budget:
            reason = QUARANTINE_BUDGET_EXCEEDED
        healthy = reason is None
        if healthy:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = now
        restart = (self._unhealthy_since is not None
                   and now - self._unhealthy_since > policy.restart_grace_s)
        health = Health(
            healthy=healthy,
            quarantined=quarantined,
            quarantine_budget=policy.quarantine_budget,
            seconds_since_progress=since,
            in_flight=in_flight,
            reason=reason,
        )
        previous = self.health
        self.changed = (
            previous is None
            or previous.healthy != healthy
            or previous.reason != reason
            or self.restart_requested != restart
        )
        self.health = health
        self.restart_requested = restart
        return health
