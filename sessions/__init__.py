"""kvhandoff.sessions: the sans-I/O core of a KV transfer.

States, events and the one transition table (``TRANSITIONS``), ``TransferSession`` with typed
per-state data and history, ``SessionTable`` (sessions by request id, deadlines, counts,
release), ``CancelResult`` and the health policy. Only the standard library and attrs are
imported; time is always passed in, nothing here sleeps, awaits or does I/O.
"""

from __future__ import annotations

from kvhandoff.sessions._cancel import CancelResult, decide_cancel
from kvhandoff.sessions._health import (
    NO_PROGRESS,
    QUARANTINE_BUDGET_EXCEEDED,
    Health,
    HealthMonitor,
    HealthPolicy,
)
from kvhandoff.sessions._session import (
    Advertised,
    BlockIds,
    Cancelled,
    Complete,
    Failed,
    Failure,
    InFlight,
    Quarantined,
    Queued,
    SessionData,
    SessionSnapshot,
    TransferSession,
    Transition,
    check_block_ids,
)
from kvhandoff.sessions._session_table import SessionTable
from kvhandoff.sessions._table import (
    IN_FLIGHT_STATES,
    OPEN_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    FailureReason,
    Role,
    State,
    allows,
    next_state,
)
from kvhandoff.sessions.errors import (
    DuplicateSessionError,
    InvalidArgumentError,
    NotReleasableError,
    SessionError,
    TransitionError,
    UnknownSessionError,
)

__all__ = [
    "IN_FLIGHT_STATES",
    "NO_PROGRESS",
    "OPEN_STATES",
    "QUARANTINE_BUDGET_EXCEEDED",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Advertised",
    "BlockIds",
    "CancelResult",
    "Cancelled",
    "Complete",
    "DuplicateSessionError",
    "Event",
    "Failed",
    "Failure",
    "FailureReason",
    "Health",
    "HealthMonitor",
    "HealthPolicy",
    "InFlight",
    "InvalidArgumentError",
    "NotReleasableError",
    "Quarantined",
    "Queued",
    "Role",
    "SessionData",
    "SessionError",
    "SessionSnapshot",
    "SessionTable",
    "State",
    "TransferSession",
    "Transition",
    "TransitionError",
    "UnknownSessionError",
    "allows",
    "check_block_ids",
    "decide_cancel",
    "next_state",
]
