"""Every exception raised by ``kvhandoff.sessions``.

They live in one module so that any part of the package can raise them without import loops.
Each carries its data as attributes; the message says what the caller should do.
"""

from __future__ import annotations

from typing import Any


class SessionError(Exception):
    """Base class of every error raised by ``kvhandoff.sessions``."""


class TransitionError(SessionError):
    """An event that is not legal for the session's current state (or whose precondition does
    not hold, see ``detail``). The session is left exactly as it was.

    Attributes: ``request_id``, ``state`` and ``event`` (the enum members), ``detail`` (str or
    None: why a precondition failed, when the table itself allowed the event).
    """

    def __init__(self, request_id: str, state: Any, event: Any, detail: str | None = None):
        self.request_id = request_id
        self.state = state
        self.event = event
        self.detail = detail
        name = getattr(state, "name", state)
        event_name = getattr(event, "name", event)
        message = f"request {request_id!r}: event {event_name} is not legal in state {name}"
        if detail:
            message += f" ({detail})"
        super().__init__(
            message + "; check the session's state before applying events to it"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.state, self.event, self.detail))


class DuplicateSessionError(SessionError):
    """A session with this request id is already in the table (attribute ``request_id``)."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(
            f"request {request_id!r} already has a session; request ids must be unique until "
            "the session is released"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id,))


class UnknownSessionError(SessionError, KeyError):
    """No session with this request id is in the table (attribute ``request_id``); it was
    never admitted or has already been released."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(
            f"no session for request {request_id!r}: it was never admitted or was already "
            "released"
        )

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id,))


class NotReleasableError(SessionError):
    """``release()`` of a session that is not terminal: its blocks may still be touched by a
    peer or the transport. Attributes: ``request_id``, ``state``."""

    def __init__(self, request_id: str, state: Any):
        self.request_id = request_id
        self.state = state
        super().__init__(
            f"request {request_id!r} is {getattr(state, 'name', state)}, not terminal: its "
            "blocks may still be in use; release only what releasable() lists"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.state))


class InvalidArgumentError(SessionError, ValueError):
    """A bad value given to a sessions API (a config field, a block id list, an event
    argument). Attributes: ``name`` (the argument) and ``value``."""

    def __init__(self, name: str, value: Any, expected: str):
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"{name}={value!r} is invalid: expected {expected}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.value, self.expected))
