"""What the host is handed: ``TransferHandle`` (its view of one transfer), ``TransferResult``,
``EngineStats`` and ``DrainReport``; and what it hands in for a batch: ``TransferRequest``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
import attrs
from kvhandoff.engine.errors import TransferCancelled, TransferFailed, TransferTimeout
from kvhandoff.sessions import FailureReason, Role, SessionSnapshot, State

if TYPE_CHECKING:
    from kvhandoff.engine._transfer import Transfer

__all__ = ["DrainReport", "EngineStats", "TransferHandle", "TransferRequest", "TransferResult",
           "error_for"]


@attrs.frozen
class TransferRequest:
    """One transfer of ``TransferEngine.send_many`` / ``receive_many``: the arguments of
    ``send`` / ``receive`` for it (``metadata`` only for a send)."""

    request_id: str
    block_ids: Sequence[int]
    peer: int
    layerwise: bool = False
    num_tokens: int | None = None
    metadata: bytes = b""


@attrs.frozen
class TransferResult:
    """A completed transfer: on this rank, and with a TP group on every rank.
    ``num_tokens``: the tokens the transfer carried (both sides agreed on it at the
    handshake; the last block may be partly valid). ``metadata``: on a receiver, the
    sender's opaque bytes (``send(..., metadata=)``, empty when none); on a sender, what it
    sent."""

    request_id: str
    role: Role
    peer: int
    nbytes: int
    seconds: float
    num_tokens: int = 0
    metadata: bytes = b""


@attrs.frozen
class EngineStats:
    """Counters of one engine (monotonic except the gauges ``sessions`` and ``states``)."""

    sessions: int
    states: dict[str, int]
    completed: int
    failed: int
    cancelled: int
    bytes_sent: int
    bytes_received: int
    ticks: int
    control_rejected: int
    #: Gauge: advertises that arrived before the host's ``send()`` and wait for it.
    early_advertises: int
    quarantines: int
    staging_allocations: int
    staging_reuses: int
    agreement_rounds: int
    #: Control payloads sent (each a frame of one or more messages).
    control_frames: int = 0


@attrs.frozen
class DrainReport:
    """What ``drain`` left behind: ``left`` are the sessions still not released (their blocks
    stay pinned: never freed early), with their states."""

    seconds: float
    released: int
    left: tuple[SessionSnapshot, ...]

    @property
    def clean(self) -> bool:
        return not self.left


class TransferHandle:
    """The host's view of one transfer. ``await wait()`` returns a ``TransferResult`` or
    raises ``TransferTimeout``, ``TransferFailed`` or ``TransferCancelled`` as soon as the
    outcome is known (an error surfaces at quarantine, while the blocks stay pinned). For a
    layer-wise send, ``layer_ready(i)`` says layer ``i`` of the KV is written."""

    __slots__ = ("_done", "_error", "_event", "_layer_ready", "_result", "_transfer",
                 "request_id")

    def __init__(self, transfer: Transfer,
                 layer_ready: Callable[[Transfer, int], None]) -> None:
        self.request_id = transfer.request_id
        self._transfer = transfer
        self._layer_ready = layer_ready
        self._done = False
        # Made by the first wait() that has to block: many handles are settled before anyone
        # waits, and an event per transfer is a measurable share of a small transfer's cost.
        self._event: anyio.Event | None = None
        self._result: TransferResult | None = None
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<TransferHandle {self.request_id!r} {self.state.name}>"

    @property
    def done(self) -> bool:
        """True once the outcome is known (``wait()`` returns or raises at once)."""
        return self._done

    @property
    def state(self) -> State:
        """The session's state (asked of the session, which outlives its release)."""
        return self._transfer.session.state

    @property
    def layerwise(self) -> bool:
        return self._transfer.layerwise

    async def wait(self) -> TransferResult:
        if self._done:
            await anyio.lowlevel.checkpoint()  # as waiting on a set event would
        else:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None  # settled: one of the two is set
        return self._result

    def layer_ready(self, layer: int) -> None:
        """Mark ``layer`` (0-based) of this layer-wise send as produced: it is sent once the
        receiver has advertised. Each layer moves as its own operation on every rank,
        whatever order the handshake and the layers arrive in (seed 003)."""
        self._layer_ready(self._transfer, layer)

    def _settle(self, result: TransferResult | None, error: BaseException | None) -> None:
        if self._done:
            return
        self._result = result
        self._error = error
        self._done = True
        if self._event is not None:
            self._event.set()


def error_for(request_id: str, reason: FailureReason, detail: str | None,
              outcome_unknown: bool = False) -> BaseException:
    """The typed error ``wait()`` raises for a failure ``reason``."""
    if reason is FailureReason.QUEUE_TIMEOUT or reason is FailureReason.TRANSFER_TIMEOUT:
        return TransferTimeout(request_id, reason, detail, outcome_unknown)
    if reason is FailureReason.CANCELLED:
        return TransferCancelled(request_id, reason, detail, outcome_unknown)
    return TransferFailed(request_id, reason, detail, outcome_unknown)
