"""``TransferEngine``: moves KV blocks between ranks, advancing only on ready futures.

Theory of operation
===================

Every request's transfer on this rank is a ``TransferSession`` (kvhandoff.sessions) kept in
one ``SessionTable``. The engine never decides a state itself: it turns what it observes into
session events and applies them through the table, so the transition table stays the one
place where states change.

The handshake, for one request::

    receiver: receive()  -> pin blocks, take a staging buffer, post the receive(s),
                            send ADVERTISE(request, blocks, bytes, layout, data tag, chunks)
    sender:   ADVERTISE  -> validate against its own send(); a mismatch fails both sides
                            with a typed reason (FAIL goes back); else gather the blocks
                            into a staging buffer and post the send(s)
    both:     handle final -> the session's local handle is final: quiescent here

One tick of the loop (``_tick``) does, without ever blocking:

1. drain arrived control messages (each decoded and validated; a malformed one is counted,
   logged and dropped, touching no session);
2. ``transport.poll()``: only the handles that became final since the last tick, so the
   cost grows with completions, not with transfers in flight;
3. expire due deadlines (a heap: O(expired)) -> quarantine, and ask the transport to cancel;
4. peer leases: a peer silent for longer than the lease fails its open transfers with
   ``peer_lost``;
5. one agreement round with the TP group, posted unconditionally on every rank (seeds 000,
   001): *outcome* is a union (one rank failed, the request failed everywhere with that
   rank's reason) and *quiescence* an intersection (blocks go back only when every rank's
   transport is done with them);
6. release sessions that are terminal and quiescent on every rank: unpin blocks (a host
   ``free()`` that was deferred happens now), return staging buffers;
7. health, and heartbeats to the peers we have transfers open with.

Failure. The error surfaces to the host at once (``wait()`` raises) while the blocks stay
pinned; the data operations are then settled in one of two ways (``_wind_down``). *Abort*
when the peer's side can no longer complete (the transfer deadline passed, the peer's lease
lapsed, the peer sent CANCEL, posting failed here): cancel what is pending and tell the peer
CANCEL. *Complete* otherwise (a transport error, the peer's FAIL, the TP group's failure, the
host's cancel): a sender posts its remaining chunks so that every receive the receiver posted
is matched, the receiver keeps its receives, and the peer is told FAIL. Completing matters
because MPI cannot cancel a posted send: a receiver that cancelled its receives would leave
the sender's blocks pinned for good. A completing transfer still aborts at the transfer
deadline, so a wedged transport cannot hold its blocks forever unless the transport itself
can neither finish nor cancel the operation, which health then reports.

Blocking waits exist only in ``drain()``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs
import torch
from kvhandoff import cuda_ext
from kvhandoff.collectives import CheckedComm, CollectiveError, rank_logger
from kvhandoff.collectives._logging import logging_enabled
from kvhandoff.engine import _wire as wire
from kvhandoff.engine._staging import StagingPool
from kvhandoff.engine.errors import (
    EngineClosedError,
    EngineConfigError,
    LayerReadyError,
    TransferCancelled,
    TransferFailed,
    TransferTimeout,
)
from kvhandoff.engine.pool import BlockPool
from kvhandoff.engine.transports import HandleKind, HandleState, Transport, TransportHandle
from kvhandoff.engine.transports.errors import ProtocolError
from kvhandoff.sessions import (
    CancelResult,
    DuplicateSessionError,
    Event,
    FailureReason,
    Health,
    HealthMonitor,
    HealthPolicy,
    Role,
    SessionSnapshot,
    SessionTable,
    State,
    TransferSession,
    Transition,
    UnknownSessionError,
)

__all__ = ["DrainReport", "EngineConfig", "EngineStats", "TransferEngine", "TransferHandle",
           "TransferResult"]

# --- configuration ---------------------------------------------------------------------------


def _optional_positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    _positive(instance, attribute, value)


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or value <= 0):
        raise EngineConfigError(attribute.name, value, "a positive finite number")


def _non_negative_int(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EngineConfigError(attribute.name, value, "a non-negative int")


@attrs.frozen
class EngineConfig:
    """Timeouts and budgets of a ``TransferEngine``; validated where it is made.

    ``queue_timeout_s`` bounds the wait from ``send``/``receive`` to the handshake,
    ``transfer_timeout_s`` the transfer from the handshake (a long queue is not a wedged
    transport). ``lease_s``: a peer with open transfers that sends nothing (heartbeats are
    sent every ``heartbeat_interval_s``, default a quarter lease) for that long is declared
    lost. ``quarantine_budget``, ``progress_deadline_s`` and ``restart_grace_s`` are the
    health policy. ``drain_timeout_s`` bounds the drain when the engine's context exits.
    ``idle_sleep_s`` is the pause of a tick that found nothing to do.
    """

    queue_timeout_s: float | None = attrs.field(default=30.0, validator=_optional_positive)
    transfer_timeout_s: float | None = attrs.field(default=30.0, validator=_optional_positive)
    lease_s: float = attrs.field(default=10.0, validator=_positive)
    heartbeat_interval_s: float | None = attrs.field(default=None,
                                                     validator=_optional_positive)
    quarantine_budget: int = attrs.field(default=16, validator=_non_negative_int)
    progress_deadline_s: float = attrs.field(default=60.0, validator=_positive)
    restart_grace_s: float = attrs.field(default=120.0, validator=_positive)
    drain_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    idle_sleep_s: float = attrs.field(default=0.0005, validator=_positive)
    max_early_advertises: int = attrs.field(default=65536, validator=_non_negative_int)
    agreement_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    recent_sessions: int = attrs.field(default=4096, validator=_non_negative_int)

    @property
    def heartbeat_every_s(self) -> float:
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        return self.lease_s / 4

    def health_policy(self) -> HealthPolicy:
        return HealthPolicy(
            quarantine_budget=self.quarantine_budget,
            progress_deadline_s=self.progress_deadline_s,
            restart_grace_s=self.restart_grace_s,
        )


# --- results handed to the host --------------------------------------------------------------


@attrs.frozen
class TransferResult:
    """A completed transfer: on this rank, and with a TP group on every rank."""

    request_id: str
    role: Role
    peer: int
    nbytes: int
    seconds: float


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
    quarantines: int
    staging_allocations: int
    staging_reuses: int
    agreement_rounds: int


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

    __slots__ = ("_done", "_engine", "_error", "_event", "_result", "_transfer", "request_id")

    def __init__(self, engine: TransferEngine, transfer: _Transfer) -> None:
        self.request_id = transfer.request_id
        self._engine = engine
        self._transfer = transfer
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
        return self._transfer.state

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
        assert self._result is not None
        return self._result

    def layer_ready(self, layer: int) -> None:
        """Mark ``layer`` (0-based) of this layer-wise send as produced: it is sent once the
        receiver has advertised. Each layer moves as its own operation on every rank,
        whatever order the handshake and the layers arrive in (seed 003)."""
        self._engine._layer_ready(self._transfer, layer)

    def _settle(self, result: TransferResult | None, error: BaseException | None) -> None:
        if self._done:
            return
        self._result = result
        self._error = error
        self._done = True
        if self._event is not None:
            self._event.set()


# --- the per-request record --------------------------------------------------------------------


@attrs.define(eq=False, slots=True)
class _Transfer:
    """Everything the engine keeps for one request besides its session (which the table
    owns). ``ops`` are the posted data operations (one, or one per layer); ``expected`` is how
    many will be posted in all, lowered when posting stops early (failure, cancel), so the
    transfer is quiescent exactly when ``posted == expected`` and nothing is pending."""

    request_id: str
    role: Role
    peer: int
    block_ids: tuple[int, ...]
    layerwise: bool
    num_chunks: int
    chunk_nbytes: int
    admitted_at: float
    handle: TransferHandle | None = None
    staging: torch.Tensor | None = None
    data_tag: int = 0
    ops: list[TransportHandle | None] = attrs.field(factory=list)
    posted: int = 0
    expected: int = 0
    ops_pending: int = 0
    op_error: str | None = None
    layers_ready: set[int] = attrs.field(factory=set)
    state: State = State.QUEUED
    # The outcome surfaced to the host (error or result) and what the TP group was told.
    outcome_known: bool = False
    reported_ok: bool = False
    reported_failed: bool = False
    reported_quiescent: bool = False
    # Whether the peer already knows the outcome (it told us, or we told it).
    peer_told: bool = False
    # How a failed transfer settles its operations (see ``TransferEngine._wind_down``).
    abort_ops: bool = False
    winding_down: bool = False
    terminal_at: float | None = None

    @property
    def total_nbytes(self) -> int:
        return self.chunk_nbytes * self.num_chunks

    @property
    def quiescent_ops(self) -> bool:
        """No operation is pending and none will be posted any more."""
        return self.ops_pending == 0 and self.posted >= self.expected


# Report codes of the agreement round: (request_id, code, reason, detail).
_OK, _FAILED, _QUIESCENT = 1, 2, 3
_Report = tuple[str, int, "str | None", "str | None"]


@attrs.define(eq=False, slots=True)
class _GroupState:
    """What the TP group said about one request so far."""

    first_seen: float
    ok: set[int] = attrs.field(factory=set)
    failure: tuple[int, str, str | None] | None = None  # (rank, reason, detail), first wins
    quiescent: set[int] = attrs.field(factory=set)


_WIRE_TO_REASON: dict[wire.FailReason, FailureReason] = {
    wire.FailReason.SIZE_MISMATCH: FailureReason.SIZE_MISMATCH,
    wire.FailReason.BLOCK_COUNT_MISMATCH: FailureReason.SIZE_MISMATCH,
    wire.FailReason.LAYOUT_MISMATCH: FailureReason.LAYOUT_MISMATCH,
    wire.FailReason.CHUNK_MISMATCH: FailureReason.LAYOUT_MISMATCH,
    wire.FailReason.UNKNOWN_REQUEST: FailureReason.PROTOCOL_ERROR,
    wire.FailReason.DUPLICATE_REQUEST: FailureReason.PROTOCOL_ERROR,
    wire.FailReason.PROTOCOL_ERROR: FailureReason.PROTOCOL_ERROR,
    wire.FailReason.CANCELLED: FailureReason.CANCELLED,
    wire.FailReason.TIMEOUT: FailureReason.PEER_FAILED,
    wire.FailReason.PEER_LOST: FailureReason.PEER_LOST,
    wire.FailReason.TRANSPORT_ERROR: FailureReason.PEER_FAILED,
    wire.FailReason.SHUTDOWN: FailureReason.PEER_FAILED,
    wire.FailReason.INTERNAL: FailureReason.PEER_FAILED,
}

_REASON_TO_WIRE: dict[FailureReason, wire.FailReason] = {
    FailureReason.QUEUE_TIMEOUT: wire.FailReason.TIMEOUT,
    FailureReason.TRANSFER_TIMEOUT: wire.FailReason.TIMEOUT,
    FailureReason.TRANSPORT_ERROR: wire.FailReason.TRANSPORT_ERROR,
    FailureReason.PEER_LOST: wire.FailReason.PEER_LOST,
    FailureReason.PEER_FAILED: wire.FailReason.INTERNAL,
    FailureReason.CANCELLED: wire.FailReason.CANCELLED,
    FailureReason.LAYOUT_MISMATCH: wire.FailReason.LAYOUT_MISMATCH,
    FailureReason.SIZE_MISMATCH: wire.FailReason.SIZE_MISMATCH,
    FailureReason.PROTOCOL_ERROR: wire.FailReason.PROTOCOL_ERROR,
}

_OPEN_STATES = frozenset({State.ADVERTISED, State.IN_FLIGHT})


class TransferEngine:
    """Moves KV blocks of ``pool`` over ``transport``; an async context manager (anyio).

    ``tp_comm`` is this rank's tensor-parallel group (a ``CheckedComm``): when given, a
    transfer completes only when every rank of the group has its shard, and blocks are
    released only when every rank's transport is done with them. ``layout_extra`` goes into
    the layout fingerprint (e.g. ``(tp_rank, tp_size)``), so two ranks whose shards do not
    match fail the handshake with ``layout_mismatch`` instead of moving wrong bytes.

    The public calls (``send``, ``receive``, ``cancel``, ``health``, ``session``, ``stats``)
    never block. Use from the event loop that entered the context; not thread-safe.

    Leaving the context drains, and a TP group's drain ends only when every rank of the group
    drains: ranks in separate processes do that naturally, but several in-process ranks that
    share one task must drain concurrently (``drain()`` of each in one task group) before
    their contexts exit, or each exit waits out ``drain_timeout_s`` for the ones after it.
    """

    def __init__(
        self,
        pool: BlockPool,
        transport: Transport,
        *,
        tp_comm: CheckedComm | None = None,
        config: EngineConfig | None = None,
        rank: int | None = None,
        layout_extra: Sequence[int | str] = (),
        on_restart: Callable[[Health], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = EngineConfig() if config is None else config
        if not isinstance(self.config, EngineConfig):
            raise EngineConfigError("config", config, "an EngineConfig")
        self.pool = pool
        self.transport = transport
        self.tp_comm = tp_comm
        self.rank = transport.rank if rank is None else rank
        self._clock = clock
        self._on_restart = on_restart
        self._log = rank_logger(self.rank)
        self._log_on = logging_enabled()
        self._table = SessionTable()
        self._transfers: dict[str, _Transfer] = {}
        self._layers = pool.layers
        self._layer_pairs = [pool.layers[2 * i:2 * i + 2] for i in range(pool.num_layers)]
        self._fingerprint = wire.layout_fingerprint(
            pool.num_layers, pool.block_shape, pool.dtype, extra=tuple(layout_extra)
        )
        self._staging = StagingPool(device=pool.device)
        now = clock()
        self._health = HealthMonitor.start(self.config.health_policy(), now)
        self._health_snapshot = self._health.update(now, in_flight=0, quarantined=0)
        self._restart_event: anyio.Event | None = None
        self._tp_error: str | None = None
        # Control plane.
        self._early_advertises: collections.OrderedDict[
            str, tuple[int, wire.Advertise, float]] = collections.OrderedDict()
        # How many early advertises each peer has waiting (changed only by _keep_early and
        # _drop_early), so heartbeats find those peers without scanning the advertises.
        self._early_sources: collections.Counter[int] = collections.Counter()
        self._last_heard: dict[int, float] = {}
        self._open_by_peer: dict[int, set[str]] = {}
        self._heartbeat_seq = itertools.count()
        self._next_heartbeat = now
        self._tags_in_use: set[int] = set()
        # Completing wind-downs, by the time they abort: (when, tiebreak, transfer).
        self._abort_at: list[tuple[float, int, _Transfer]] = []
        self._abort_seq = itertools.count()
        self._abort_grace_s = self.config.transfer_timeout_s or self.config.lease_s
        self._next_tag = 1
        # Agreement: reports waiting for the next round, what the group said so far, and
        # requests the group has not settled on (checked in arrival order for the grace).
        self._outbox: list[_Report] = []
        self._group: dict[str, _GroupState] = {}
        self._unsettled: collections.deque[tuple[float, str]] = collections.deque()
        self._round: Any = None
        # Released sessions (out of the table, so never changed again), snapshotted only when
        # asked for: most never are.
        self._recent: collections.OrderedDict[str, TransferSession] = collections.OrderedDict()
        # Counters.
        self._completed = self._failed = self._cancelled = self._released = 0
        self._bytes_sent = self._bytes_received = 0
        self._ticks = self._rejected = self._quarantines = self._rounds = 0
        self._progress_completions = self._progress_bytes = 0
        # Lifecycle.
        self._accepting = True
        self._draining = False
        self._stopped = False
        self._group_done = tp_comm is None
        self._wake: anyio.Event | None = None
        self._task_group: Any = None

    # --- context manager ------------------------------------------------------------------

    async def __aenter__(self) -> TransferEngine:
        # The block-copy extension JIT-builds on first use (tens of seconds the first time on
        # a machine): build it in a worker thread now rather than inside the first tick, where
        # it would freeze this loop and every engine sharing it.
        await anyio.to_thread.run_sync(cuda_ext.backend, self.pool.device)
        self._wake = anyio.Event()
        self._restart_event = anyio.Event()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        try:
            with anyio.CancelScope(shield=exc_info[0] is not None):
                await self.drain(self.config.drain_timeout_s)
        finally:
            self._stopped = True
            self._poke()
            result = await self._task_group.__aexit__(*exc_info)
        return result

    async def _run(self) -> None:
        while not self._stopped:
            if self._tick():
                await anyio.lowlevel.checkpoint()
            else:
                wake = self._wake = anyio.Event()
                with anyio.move_on_after(self.config.idle_sleep_s):
                    await wake.wait()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- public calls -----------------------------------------------------------------------

    def send(self, request_id: str, block_ids: Iterable[int], peer: int, *,
             layerwise: bool = False) -> TransferHandle:
        """Send the KV of ``block_ids`` (every layer, K and V) to ``peer`` once the receiver
        there has advertised a matching ``receive``. The blocks stay pinned until the
        transfer is quiescent; the host may ``free()`` them at any time (the pool defers
        it). With ``layerwise=True`` each layer moves as soon as ``handle.layer_ready(i)``
        was called and the receiver has advertised."""
        transfer = self._admit(request_id, block_ids, peer, Role.SENDER, layerwise)
        early = self._drop_early(request_id)
        if early is not None and transfer.state is State.QUEUED:  # else failed at admission
            source, advertise, _ = early
            self._on_advertise(source, advertise, self._clock())
        self._settle_local_reports()
        return self._handle_of(transfer)

    def receive(self, request_id: str, block_ids: Iterable[int], peer: int, *,
                layerwise: bool = False) -> TransferHandle:
        """Receive a request's KV from ``peer`` into ``block_ids``: the receive is posted and
        advertised at once. ``layerwise`` must match the sender's (``layout_mismatch``
        otherwise)."""
        transfer = self._admit(request_id, block_ids, peer, Role.RECEIVER, layerwise)
        # Admission may already have failed it (the TP group failed the request first): then
        # nothing is posted, or the transport could write into a staging buffer that the
        # release hands back; the peer was told by the failure.
        if transfer.state is State.QUEUED:
            self._advertise_receive(transfer, self._clock())
        self._settle_local_reports()
        return self._handle_of(transfer)

    def cancel(self, request_id: str) -> CancelResult:
        """Cancel a transfer. ``result.safe_to_free`` says whether the host may free the
        blocks now; otherwise cancel was asked of the transport and the peer, ``wait()``
        raises ``TransferCancelled`` at once, and the blocks stay pinned until quiescent."""
        now = self._clock()
        transfer = self._transfers.get(request_id)
        session = self._table.find(request_id)
        state = None if session is None else session.state
        cancellable = True
        if transfer is not None:
            kind = HandleKind.SEND if transfer.role is Role.SENDER else HandleKind.RECV
            cancellable = kind in self.transport.cancellable_kinds
        before = 0 if session is None else len(session.history)
        result = self._table.cancel(request_id, healthy=self._health_snapshot.healthy,
                                    cancellable=cancellable, now=now)
        if self._log_on:
            self._log.info("session.cancel", request_id=request_id,
                           state=None if state is None else state.name, result=result.name,
                           safe_to_free=result.safe_to_free)
        if transfer is not None and session is not None and result in (
                CancelResult.CANCELLED_BEFORE_ADVERTISE,
                CancelResult.CANCEL_REQUESTED_IN_FLIGHT):
            self._after(transfer, session.history[before:], now)
            if not transfer.outcome_known:  # IN_FLIGHT with cancel requested
                self._surface_failure(transfer, FailureReason.CANCELLED.value,
                                      "cancelled by the host", now)
            self._wind_down(transfer, now)
            self._settle_local_reports()
            self._poke()
        return result

    def health(self) -> Health:
        """The latest health snapshot (recomputed every tick)."""
        return self._health_snapshot

    @property
    def restart_requested(self) -> bool:
        """True while the engine has been unhealthy for longer than the grace period (a
        routine per-request timeout never asks for a restart), or its TP group broke."""
        return self._health.restart_requested or self._tp_error is not None

    async def wait_restart_requested(self) -> Health:
        """Return once the engine asks the host to restart it (``on_restart`` is the
        callback form)."""
        if self._restart_event is None:
            raise EngineClosedError("wait_restart_requested", "use inside `async with engine`")
        await self._restart_event.wait()
        return self._health_snapshot

    def session(self, request_id: str) -> SessionSnapshot:
        """A read-only snapshot of a live session, or of one of the last
        ``config.recent_sessions`` released ones; ``UnknownSessionError`` otherwise."""
        found = self._table.find(request_id)
        if found is not None:
            return found.snapshot()
        recent = self._recent.get(request_id)
        if recent is None:
            raise UnknownSessionError(request_id)
        return recent.snapshot()

    def stats(self) -> EngineStats:
        return EngineStats(
            sessions=len(self._table),
            states={state.name: count for state, count in self._table.counts().items()},
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            ticks=self._ticks,
            control_rejected=self._rejected,
            quarantines=self._quarantines,
            staging_allocations=self._staging.allocations,
            staging_reuses=self._staging.reuses,
            agreement_rounds=self._rounds,
        )

    async def drain(self, timeout: float) -> DrainReport:
        """Stop admitting transfers (``EngineClosedError``) and wait at most ``timeout``
        seconds until every session is released, on every rank of the TP group. Whatever is
        left is reported and logged (``engine.drain_left``); its blocks stay pinned. The only
        place the engine blocks on the transport, and only once the bound is nearly spent."""
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout) or timeout <= 0):
            raise EngineConfigError("timeout", timeout, "a positive finite number of seconds")
        # The bound is real time even with an injected ``clock`` (a test's manual clock may
        # stand still): drain holds up its caller and must end.
        start = time.monotonic()
        released_before = self._released
        self._accepting = False
        self._draining = True
        deadline = start + timeout
        while time.monotonic() < deadline and not (not self._transfers and self._group_done):
            if self._task_group is None:  # no running loop: tick here
                if not self._tick():
                    await anyio.sleep(self.config.idle_sleep_s)
            else:
                self._poke()
                await anyio.sleep(self.config.idle_sleep_s)
        pending = [op for transfer in self._transfers.values() for op in transfer.ops
                   if op is not None and not op.final]
        if pending:
            # Bounded blocking wait for operations that may yet finish (a last send the
            # peer is still draining): only drain may block.
            slice_s = max(0.0, deadline - time.monotonic()) / len(pending)
            for op in pending:
                op.wait(timeout=slice_s)
            self._tick()
        left = tuple(self._table.get(rid).snapshot() for rid in self._transfers)
        if left and self._log_on:
            self._log.warning("engine.drain_left", left=[
                {"request_id": s.request_id, "state": s.state.name} for s in left])
        return DrainReport(seconds=time.monotonic() - start,
                           released=self._released - released_before, left=left)

    # --- admission ------------------------------------------------------------------------

    def _admit(self, request_id: str, block_ids: Iterable[int], peer: int, role: Role,
               layerwise: bool) -> _Transfer:
        if not self._accepting:
            raise EngineClosedError(request_id, "the engine is draining")
        if request_id in self._transfers:
            raise DuplicateSessionError(request_id)
        world = self.transport.world_size
        if (isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < world
                or peer == self.transport.rank):
            raise EngineConfigError("peer", peer, f"a rank in 0..{world - 1} other than this "
                                    f"rank ({self.transport.rank})")
        ids = tuple(block_ids)
        if not ids:
            raise EngineConfigError("block_ids", ids, "at least one block id")
        now = self._clock()
        # Pin (which validates the ids against the pool) before admitting, and undo the pin
        # if admission refuses: every failure leaves the pool and the table as they were.
        self.pool.pin(ids, owner=request_id)
        try:
            session = self._table.admit(request_id, role, peer, ids, now,
                                        queue_timeout_s=self.config.queue_timeout_s,
                                        transfer_timeout_s=self.config.transfer_timeout_s)
        except BaseException:
            self.pool.unpin(ids, owner=request_id)
            raise
        num_chunks = self.pool.num_layers if layerwise else 1
        transfer = _Transfer(
            request_id=request_id, role=role, peer=peer, block_ids=ids,
            layerwise=bool(layerwise), num_chunks=num_chunks,
            chunk_nbytes=self.pool.block_nbytes * len(ids) // num_chunks, admitted_at=now,
            expected=num_chunks,
        )
        transfer.handle = TransferHandle(self, transfer)
        self._transfers[request_id] = transfer
        open_with_peer = self._open_by_peer.get(peer)
        if open_with_peer is None:
            open_with_peer = self._open_by_peer[peer] = set()
        open_with_peer.add(request_id)
        if self._log_on:  # ``history`` is a copy: make it only to log it
            self._log_transitions(transfer, session.history)
        group = self._group.get(request_id)
        if group is not None:  # the TP group already spoke about this request
            self._decide(request_id, group, now)
        self._poke()
        return transfer

    @staticmethod
    def _handle_of(transfer: _Transfer) -> TransferHandle:
        assert transfer.handle is not None
        return transfer.handle

    # --- the handshake ------------------------------------------------------------------------

    def _take_tags(self, count: int) -> int:
        top = self.transport.max_tag - count + 1
        for _ in range(len(self._tags_in_use) + 1):
            first = self._next_tag
            self._next_tag = first + count if first + count <= top else 1
            tags = range(first, first + count)
            if self._tags_in_use.isdisjoint(tags):
                self._tags_in_use.update(tags)
                return first
        raise EngineConfigError("data tags", count, "a free data tag range")

    def _advertise_receive(self, transfer: _Transfer, now: float) -> None:
        transfer.staging = self._staging.acquire(transfer.total_nbytes)
        transfer.data_tag = self._take_tags(transfer.num_chunks)
        transfer.ops = [None] * transfer.num_chunks
        for chunk in range(transfer.num_chunks):
            if not self._post(transfer, HandleKind.RECV, chunk, now):
                return
        self._note_peer_engaged(transfer.peer, now)
        self._send_control(transfer.peer, wire.Advertise(
            request_id=transfer.request_id, block_count=len(transfer.block_ids),
            total_bytes=transfer.total_nbytes, layout_fingerprint=self._fingerprint,
            data_tag=transfer.data_tag, num_chunks=transfer.num_chunks,
        ))

    def _on_advertise(self, source: int, advertise: wire.Advertise, now: float) -> None:
        rid = advertise.request_id
        transfer = self._transfers.get(rid)
        if transfer is None:
            if (rid in self._early_advertises
                    or len(self._early_advertises) >= self.config.max_early_advertises):
                self._reject(source, "advertise", f"duplicate or one too many early advertise "
                             f"for {rid!r}")
                self._send_control(source, wire.Cancel(
                    rid, wire.FailReason.DUPLICATE_REQUEST, "advertise not accepted"))
            else:  # the receiver was faster than our host's send(): keep it until then
                self._keep_early(rid, source, advertise, now)
            return
        if transfer.role is not Role.SENDER or transfer.peer != source:
            self._reject(source, "advertise", f"{rid!r} is not a send to rank {source}")
            self._send_control(source, wire.Cancel(rid, wire.FailReason.UNKNOWN_REQUEST,
                                                   "no matching send on this rank"))
            return
        if transfer.state is not State.QUEUED:
            self._reject(source, "advertise", f"second advertise for {rid!r}")
            return
        mismatch = wire.validate_advertise(
            advertise, request_id=rid, block_count=len(transfer.block_ids),
            total_bytes=transfer.total_nbytes, layout_fingerprint=self._fingerprint,
            num_chunks=transfer.num_chunks,
        )
        if mismatch is not None:
            # CANCEL: we post nothing, so the receiver must cancel its receives.
            self._send_control(source, wire.Cancel(rid, mismatch.reason, mismatch.detail))
            transfer.peer_told = True
            self._apply(transfer, Event.ABORT, now, reason=_WIRE_TO_REASON[mismatch.reason],
                        detail=mismatch.detail)
            return
        transfer.data_tag = advertise.data_tag
        transfer.staging = self._staging.acquire(transfer.total_nbytes)
        transfer.ops = [None] * transfer.num_chunks
        self._note_peer_engaged(source, now)
        self._apply(transfer, Event.ADVERTISE, now)
        if not transfer.layerwise:
            self._post_chunk(transfer, 0, now)
            return
        # One operation per layer, in layer order, however many were ready already: batching
        # by what happens to be ready would give ranks different granularities (seed 003).
        for layer in sorted(transfer.layers_ready):
            self._post_chunk(transfer, layer, now)

    def _keep_early(self, request_id: str, source: int, advertise: wire.Advertise,
                    now: float) -> None:
        self._early_advertises[request_id] = (source, advertise, now)
        self._early_sources[source] += 1

    def _drop_early(self, request_id: str) -> tuple[int, wire.Advertise, float] | None:
        early = self._early_advertises.pop(request_id, None)
        if early is not None:
            source = early[0]
            self._early_sources[source] -= 1
            if not self._early_sources[source]:
                del self._early_sources[source]
        return early

    def _layer_ready(self, transfer: _Transfer, layer: int) -> None:
        if not transfer.layerwise or transfer.role is not Role.SENDER:
            raise LayerReadyError(transfer.request_id, layer, "a layer-wise send's handle")
        if (isinstance(layer, bool) or not isinstance(layer, int)
                or not 0 <= layer < self.pool.num_layers):
            raise LayerReadyError(transfer.request_id, layer,
                                  f"a layer index in 0..{self.pool.num_layers - 1}")
        if layer in transfer.layers_ready:
            raise LayerReadyError(transfer.request_id, layer, "a layer not marked ready yet")
        transfer.layers_ready.add(layer)
        if transfer.state in _OPEN_STATES and transfer.posted < transfer.expected:
            self._post_chunk(transfer, layer, self._clock())
            self._settle_local_reports()
            self._poke()

    def _post_chunk(self, transfer: _Transfer, chunk: int, now: float, *,
                    force: bool = False) -> None:
        """Gather and post one chunk. After a failure only a completing wind-down posts
        (``force``); an aborted transfer posts nothing more."""
        if transfer.abort_ops or transfer.posted >= transfer.expected or (
                transfer.outcome_known and not force):
            return
        assert transfer.staging is not None
        layers = self._layer_pairs[chunk] if transfer.layerwise else self._layers
        view = _chunk_view(transfer, chunk)
        try:
            cuda_ext.gather(layers, transfer.block_ids, view)
        except Exception as exc:  # a bad block table must fail this transfer, not the loop
            self._local_error(transfer, FailureReason.TRANSPORT_ERROR, repr(exc), now)
            return
        self._post(transfer, HandleKind.SEND, chunk, now)

    def _post(self, transfer: _Transfer, kind: HandleKind, chunk: int, now: float) -> bool:
        """Post one data operation; on the first, the session goes ``IN_FLIGHT`` (through
        ``ADVERTISED`` for a receiver, which advertises right after posting)."""
        view = _chunk_view(transfer, chunk)
        tag = transfer.data_tag + chunk
        try:
            if kind is HandleKind.SEND:
                op = self.transport.post_send(view, transfer.peer, tag)
            else:
                op = self.transport.post_recv(view, transfer.peer, tag)
        except Exception as exc:
            self._local_error(transfer, FailureReason.TRANSPORT_ERROR, repr(exc), now)
            return False
        op.token = transfer
        transfer.ops[chunk] = op
        transfer.posted += 1
        transfer.ops_pending += 1
        if transfer.state is State.QUEUED:
            self._apply(transfer, Event.ADVERTISE, now)
        if transfer.state is State.ADVERTISED:
            self._apply(transfer, Event.POSTED, now, handle=transfer)
        return True

    # --- control messages -------------------------------------------------------------------

    def _on_control(self, source: int, payload: bytes, now: float) -> None:
        self._last_heard[source] = now  # any message renews the peer's lease
        try:
            message = wire.decode(payload)
        except ProtocolError as exc:
            self._reject(source, "decode", f"{type(exc).__name__}: {exc}")
            return
        if isinstance(message, wire.Advertise):
            self._on_advertise(source, message, now)
        elif isinstance(message, (wire.Fail, wire.Cancel)):
            self._on_peer_failure(source, message, now)

    def _on_peer_failure(self, source: int, message: wire.Fail | wire.Cancel,
                         now: float) -> None:
        rid = message.request_id
        early = self._early_advertises.get(rid)
        if early is not None and early[0] == source:
            self._drop_early(rid)
            return
        transfer = self._transfers.get(rid)
        if transfer is None or transfer.peer != source:
            if transfer is None and rid in self._recent:
                return  # a late word on a transfer already settled and released here
            self._reject(source, message.KIND.name.lower(), f"unknown request {rid!r}")
            return
        cancel = isinstance(message, wire.Cancel)
        if transfer.outcome_known:
            # Already failed here; the first reason stays. A CANCEL still means the peer's
            # side will never complete, so ours must abort.
            if cancel and not transfer.abort_ops:
                transfer.abort_ops = True
                self._wind_down(transfer, now)
            return
        detail = f"rank {source}: {message.reason.label}"
        if message.detail:
            detail = f"{detail} ({message.detail})"
        transfer.abort_ops = cancel
        # The peer knows the outcome; a sender that posted nothing must still say CANCEL,
        # since the receiver would otherwise wait for sends that never come.
        transfer.peer_told = cancel or transfer.role is Role.RECEIVER or bool(transfer.posted)
        self._apply(transfer, Event.ABORT, now, reason=_WIRE_TO_REASON[message.reason],
                    detail=detail[:wire.MAX_DETAIL_BYTES])

    def _reject(self, source: int, what: str, detail: str) -> None:
        self._rejected += 1
        if self._log_on:
            self._log.warning("control.rejected", source=source, what=what, detail=detail)

    def _send_control(self, peer: int, message: wire.ControlMessage) -> None:
        try:
            self.transport.send_control(peer, wire.encode(message))
        except Exception as exc:  # a closed or broken transport must not break the loop
            if self._log_on:
                self._log.warning("control.send_failed", peer=peer, error=repr(exc))

    def _note_peer_engaged(self, peer: int, now: float) -> None:
        # The lease on a peer starts, at the latest, when a transfer with it opens.
        if self._last_heard.get(peer, -math.inf) < now:
            self._last_heard[peer] = now

    # --- transitions and outcomes ----------------------------------------------------------

    def _apply(self, transfer: _Transfer, event: Event, now: float, **kwargs: Any) -> None:
        self._after(transfer, self._table.apply(transfer.request_id, event, now, **kwargs),
                    now)

    def _after(self, transfer: _Transfer, made: Sequence[Transition], now: float) -> None:
        """Everything that follows from transitions just made: log them, surface a failure
        (to the host, the TP group and the peer), and report quiescence."""
        if not made:
            return
        self._log_transitions(transfer, made)
        session = self._table.get(transfer.request_id)
        state = transfer.state = session.state
        for t in made:
            if t.to_state is State.QUARANTINED:
                self._quarantines += 1
                break
        failure = session.failure
        if failure is not None and not transfer.outcome_known:
            self._surface_failure(transfer, failure.reason.value, failure.detail, now)
        elif state is State.CANCELLED and not transfer.outcome_known:
            self._surface_failure(transfer, FailureReason.CANCELLED.value,
                                  "cancelled before advertise", now)
        if failure is not None or state is State.CANCELLED or session.cancel_requested:
            self._wind_down(transfer, now)
        if state.is_terminal and transfer.terminal_at is None:
            transfer.terminal_at = now
            if state is State.COMPLETE:
                self._completed += 1
            elif state is State.FAILED:
                self._failed += 1
            else:
                self._cancelled += 1
            self._report(transfer, _QUIESCENT)

    def _surface_failure(self, transfer: _Transfer, reason: str, detail: str | None,
                         now: float) -> None:
        transfer.outcome_known = True
        if transfer.handle is not None:
            transfer.handle._settle(None, _error_for(transfer.request_id, reason, detail))
        if not transfer.reported_failed:
            self._report(transfer, _FAILED, reason, detail)
        if not transfer.peer_told:
            transfer.peer_told = True  # tell the peer once
            # CANCEL: nothing of ours is or will be in flight, the peer must abort its side;
            # FAIL: our posted operations run to completion, the peer should complete its own.
            kind = wire.Cancel if transfer.abort_ops or not transfer.posted else wire.Fail
            self._send_control(transfer.peer, kind(
                transfer.request_id, _REASON_TO_WIRE[FailureReason(reason)],
                (detail or "")[:wire.MAX_DETAIL_BYTES]))

    def _wind_down(self, transfer: _Transfer, now: float) -> None:
        """Settle the data operations of a failed or cancelled transfer, in one of two ways.

        *Abort* (the deadline passed, the peer is lost, the peer sent CANCEL, or posting
        failed here): cancel what is pending, best effort, and post nothing more.

        *Complete* (anything else: a transport error, a FAIL from the peer, the TP group's
        failure, the host's cancel): a sender that has posted any chunk posts the remaining
        ones, so that every receive the receiver posted is matched and both sides become
        quiescent even over a transport that cannot cancel a posted send (MPI); the receiver
        keeps its receives. The bytes are discarded. A completing transfer still aborts at
        the transfer deadline (``_abort_due``), so a wedged transport cannot hold it forever.
        """
        if transfer.state.is_terminal:
            return
        if transfer.abort_ops:
            transfer.expected = transfer.posted
            for op in transfer.ops:
                if op is not None and not op.final:
                    op.cancel()
        elif not transfer.winding_down:
            transfer.winding_down = True
            if transfer.role is Role.SENDER and transfer.posted:
                for chunk, op in enumerate(transfer.ops):
                    if op is None:
                        self._post_chunk(transfer, chunk, now, force=True)
            else:
                transfer.expected = transfer.posted
            if transfer.ops_pending:
                heapq.heappush(self._abort_at, (now + self._abort_grace_s,
                                                next(self._abort_seq), transfer))
        if transfer.quiescent_ops and transfer.posted and transfer.state in (
                State.QUARANTINED, State.IN_FLIGHT) and not self._table.get(
                transfer.request_id).local_final:
            self._local_final(transfer, now)

    def _abort_due(self, now: float) -> bool:
        """Completing wind-downs whose transfer deadline passed: abort them (and tell the
        peer to abort its side). Cost: O(due)."""
        due = self._abort_at
        busy = False
        while due and due[0][0] <= now:
            _, _, transfer = heapq.heappop(due)
            if (self._transfers.get(transfer.request_id) is not transfer
                    or not transfer.ops_pending or transfer.abort_ops):
                continue
            busy = True
            transfer.abort_ops = True
            self._send_control(transfer.peer, wire.Cancel(
                transfer.request_id, wire.FailReason.TIMEOUT,
                "operations still pending at the transfer deadline"))
            self._wind_down(transfer, now)
        return busy

    def _local_error(self, transfer: _Transfer, reason: FailureReason, detail: str,
                     now: float) -> None:
        """Posting failed here: what was posted is aborted (the peer is told CANCEL)."""
        transfer.abort_ops = True
        if transfer.state is State.QUARANTINED:
            self._wind_down(transfer, now)
        elif not transfer.state.is_terminal:
            self._apply(transfer, Event.ABORT, now, reason=reason, detail=detail[:256])

    def _log_transitions(self, transfer: _Transfer, made: Iterable[Transition]) -> None:
        if not self._log_on:
            return
        for t in made:
            self._log.info(
                "session.transition", request_id=transfer.request_id,
                role=transfer.role.value, peer=transfer.peer, from_state=t.from_state.name,
                to_state=t.to_state.name, trigger=t.event.name,
                reason=None if t.failure is None else t.failure.reason.value,
            )

    # --- completions ------------------------------------------------------------------------

    def _on_op_final(self, op: TransportHandle, now: float) -> None:
        transfer = op.token
        if not isinstance(transfer, _Transfer) or \
                self._transfers.get(transfer.request_id) is not transfer:
            return
        transfer.ops_pending -= 1
        self._progress_completions += 1
        if op.state is HandleState.DONE:
            self._progress_bytes += op.nbytes
            if op.kind is HandleKind.SEND:
                self._bytes_sent += op.nbytes
            else:
                self._bytes_received += op.nbytes
        elif transfer.op_error is None:
            transfer.op_error = op.error or "transport error"
            if transfer.state in _OPEN_STATES and not transfer.quiescent_ops:
                # Other operations may still touch the buffer: surface the error now and
                # keep everything pinned (quarantine) until they are final.
                self._apply(transfer, Event.ABORT, now, reason=FailureReason.TRANSPORT_ERROR,
                            detail=transfer.op_error[:256])
        if transfer.quiescent_ops and transfer.state in (State.IN_FLIGHT, State.QUARANTINED):
            self._local_final(transfer, now)

    def _local_final(self, transfer: _Transfer, now: float) -> None:
        """Every operation of the transfer is final: the session is quiescent here."""
        session = self._table.get(transfer.request_id)
        if session.local_final:
            return
        if transfer.state is State.QUARANTINED or session.cancel_requested:
            # The outcome is already failure; HANDLE_DONE settles it (the reason stays).
            self._apply(transfer, Event.HANDLE_DONE, now)
            return
        if transfer.op_error is not None:
            self._apply(transfer, Event.HANDLE_FAILED, now,
                        reason=FailureReason.TRANSPORT_ERROR, detail=transfer.op_error[:256])
            return
        if transfer.role is Role.RECEIVER:
            assert transfer.staging is not None
            try:
                cuda_ext.scatter(transfer.staging, self._layers, transfer.block_ids)
            except Exception as exc:
                self._apply(transfer, Event.HANDLE_FAILED, now,
                            reason=FailureReason.TRANSPORT_ERROR, detail=repr(exc)[:256])
                return
        self._apply(transfer, Event.HANDLE_DONE, now)
        self._report(transfer, _OK)

    # --- agreement ----------------------------------------------------------------------------

    def _report(self, transfer: _Transfer, code: int, reason: str | None = None,
                detail: str | None = None) -> None:
        if code == _OK:
            if transfer.reported_ok:
                return
            transfer.reported_ok = True
        elif code == _FAILED:
            if transfer.reported_failed:
                return
            transfer.reported_failed = True
        else:
            if transfer.reported_quiescent:
                return
            transfer.reported_quiescent = True
        self._outbox.append((transfer.request_id, code, reason, detail))

    def _settle_local_reports(self) -> None:
        """Without a (working) TP group this rank is the whole group: its own reports decide
        at once. Processed here, after the call that produced them, never re-entrantly."""
        if not self._outbox or (self.tp_comm is not None and self._tp_error is None):
            return
        now = self._clock()
        while self._outbox:
            items, self._outbox = self._outbox, []
            self._absorb(0, items, now)

    def _agreement_round(self, now: float) -> bool:
        """Test the round in flight and post the next one. Every rank posts every round
        whatever its local state: never inside a rank-local condition (seeds 000, 001)."""
        comm = self.tp_comm
        if comm is None or self._tp_error is not None or self._group_done:
            return False
        busy = False
        if self._round is not None:
            try:
                if not self._round.test():
                    return False
                results = self._round.result()
            except CollectiveError as exc:
                self._tp_failed(exc, now)
                return True
            self._round = None
            self._rounds += 1
            all_done = True
            for tp_rank, (done, items) in enumerate(results):
                all_done = all_done and bool(done)
                if items:
                    busy = True
                    self._absorb(tp_rank, items, now)
            if all_done:
                self._group_done = True  # the same round ends the agreement on every rank
                return busy
        payload = (self._draining and not self._transfers and not self._outbox, self._outbox)
        self._outbox = []
        try:
            self._round = comm.iallgather(payload, tag="kvhandoff.engine.agreement",
                                          timeout=self.config.agreement_timeout_s)
        except CollectiveError as exc:
            self._tp_failed(exc, now)
        return busy

    @property
    def _group_size(self) -> int:
        if self.tp_comm is None or self._tp_error is not None:
            return 1
        return self.tp_comm.size

    def _absorb(self, tp_rank: int, items: Sequence[_Report], now: float) -> None:
        for rid, code, reason, detail in items:
            group = self._group.get(rid)
            if group is None:
                group = self._group[rid] = _GroupState(first_seen=now)
                if self._group_size > 1:
                    self._unsettled.append((now, rid))
            if code == _OK:
                group.ok.add(tp_rank)
            elif code == _FAILED:
                if group.failure is None:
                    group.failure = (tp_rank, reason or FailureReason.PEER_FAILED.value, detail)
            else:
                group.quiescent.add(tp_rank)
            self._decide(rid, group, now)

    def _decide(self, rid: str, group: _GroupState, now: float) -> None:
        """Outcome is a union, quiescence an intersection."""
        size = self._group_size
        transfer = self._transfers.get(rid)
        if transfer is not None:
            if group.failure is not None:
                if not transfer.outcome_known and transfer.state in (
                        State.QUEUED, State.ADVERTISED, State.IN_FLIGHT):
                    rank, reason, detail = group.failure
                    transfer.reported_failed = True  # the group knows already
                    where = f"tp rank {rank}"
                    self._apply(transfer, Event.ABORT, now, reason=reason,
                                detail=(f"{where}: {detail}" if detail else where)[:256])
            elif len(group.ok) == size and transfer.state is State.IN_FLIGHT:
                self._apply(transfer, Event.COMPLETED, now)
                transfer.outcome_known = True
                if transfer.handle is not None:
                    transfer.handle._settle(TransferResult(
                        request_id=rid, role=transfer.role, peer=transfer.peer,
                        nbytes=transfer.total_nbytes, seconds=now - transfer.admitted_at,
                    ), None)
            if len(group.quiescent) == size and transfer.state.is_terminal:
                self._release(transfer)
        if len(group.quiescent) == size:
            self._group.pop(rid, None)

    def _expire_unsettled(self, now: float) -> None:
        """A request some TP rank never admitted would keep the others' blocks pinned
        forever; after both timeouts have passed, each rank releases on its own quiescence
        (memory safety never depends on the group: only this rank's transport touches its
        blocks). Cost: O(requests due)."""
        grace = (self.config.queue_timeout_s or 0.0) + (self.config.transfer_timeout_s or 0.0)
        grace = max(grace, self.config.agreement_timeout_s)
        unsettled = self._unsettled
        while unsettled and now - unsettled[0][0] > grace:
            _, rid = unsettled.popleft()
            group = self._group.get(rid)
            if group is None:
                continue
            transfer = self._transfers.get(rid)
            if transfer is None:
                del self._group[rid]
            elif transfer.state.is_terminal:
                if self._log_on:
                    self._log.warning("engine.group_incomplete", request_id=rid,
                                      quiescent=sorted(group.quiescent))
                del self._group[rid]
                self._release(transfer)
            else:
                unsettled.append((now, rid))  # still busy here: look again later

    def _tp_failed(self, exc: CollectiveError, now: float) -> None:
        """The TP group broke (desync, timeout, closed): agreement is impossible, so every
        open transfer fails and each rank releases its own blocks on its own quiescence."""
        self._tp_error = f"{type(exc).__name__}: {exc}"[:512]
        self._round = None
        self._group_done = True
        self._group.clear()
        self._unsettled.clear()
        if self._log_on:
            self._log.error("engine.tp_failed", error=self._tp_error)
        for transfer in list(self._transfers.values()):
            if not transfer.outcome_known and transfer.state in (
                    State.QUEUED, State.ADVERTISED, State.IN_FLIGHT):
                self._apply(transfer, Event.ABORT, now, reason=FailureReason.PEER_FAILED,
                            detail="tp group failed")
        for transfer in list(self._transfers.values()):
            if transfer.state.is_terminal:
                self._release(transfer)
        self._settle_local_reports()

    # --- release ----------------------------------------------------------------------------

    def _release(self, transfer: _Transfer) -> None:
        rid = transfer.request_id
        if self._transfers.get(rid) is not transfer:
            return
        session = self._table.release(rid)
        del self._transfers[rid]
        self._released += 1
        peers = self._open_by_peer.get(transfer.peer)
        if peers is not None:
            peers.discard(rid)
            if not peers:
                del self._open_by_peer[transfer.peer]
        self.pool.unpin(transfer.block_ids, owner=rid)
        if transfer.staging is not None:
            self._staging.release(transfer.staging)
            transfer.staging = None
        # Nothing follows these links after release (every operation is final, the outcome
        # is settled); cutting them breaks the transfer <-> handle and transfer <-> operation
        # cycles, so a released record is freed at once instead of by the cyclic collector.
        transfer.handle = None
        for op in transfer.ops:
            if op is not None:
                op.token = None
        if transfer.role is Role.RECEIVER and transfer.data_tag:
            self._tags_in_use.difference_update(
                range(transfer.data_tag, transfer.data_tag + transfer.num_chunks))
        if self.config.recent_sessions:
            self._recent[rid] = session
            while len(self._recent) > self.config.recent_sessions:
                self._recent.popitem(last=False)

    # --- the tick -------------------------------------------------------------------------------

    def _tick(self) -> bool:
        """One pass of the loop; True when it did something (the loop then yields instead
        of sleeping). Never blocks."""
        now = self._clock()
        self._ticks += 1
        busy = False
        transport = self.transport
        for source, payload in transport.recv_control():
            busy = True
            self._on_control(source, payload, now)
        for op in transport.poll():
            busy = True
            self._on_op_final(op, now)
        for session, made in self._table.expire_due(now):
            busy = True
            transfer = self._transfers[session.request_id]
            transfer.abort_ops = True  # past the deadline: presumed wedged, cancel
            self._after(transfer, made, now)
        if self._abort_at:
            busy = self._abort_due(now) or busy
        if self._early_advertises:
            self._expire_early_advertises(now)
        if self._open_by_peer:
            self._check_leases(now)
        if self._unsettled:
            self._expire_unsettled(now)
        busy = self._agreement_round(now) or busy
        self._settle_local_reports()
        self._update_health(now)
        if now >= self._next_heartbeat:
            self._send_heartbeats(now)
        return busy

    def _expire_early_advertises(self, now: float) -> None:
        timeout = self.config.queue_timeout_s
        if timeout is None:
            return
        early = self._early_advertises
        while early:
            rid, (source, _, at) = next(iter(early.items()))
            if now - at < timeout:
                break
            self._drop_early(rid)
            self._send_control(source, wire.Cancel(
                rid, wire.FailReason.UNKNOWN_REQUEST,
                "no matching send within the queue timeout"))

    def _check_leases(self, now: float) -> None:
        lease = self.config.lease_s
        for peer, rids in list(self._open_by_peer.items()):
            last = self._last_heard.get(peer)
            if last is None or now - last <= lease:
                continue
            for rid in list(rids):
                transfer = self._transfers.get(rid)
                if transfer is not None and transfer.state in _OPEN_STATES \
                        and not transfer.outcome_known:
                    transfer.peer_told = True  # nobody there to tell
                    transfer.abort_ops = True
                    self._apply(transfer, Event.ABORT, now, reason=FailureReason.PEER_LOST,
                                detail=f"no message from rank {peer} for {now - last:.1f}s")

    def _send_heartbeats(self, now: float) -> None:
        self._next_heartbeat = now + self.config.heartbeat_every_s
        peers = set(self._open_by_peer)
        peers.update(self._early_sources)
        for peer in peers:
            count = len(self._open_by_peer.get(peer, ()))
            self._send_control(peer, wire.Heartbeat(
                sender_rank=self.transport.rank, sequence=next(self._heartbeat_seq),
                open_requests=min(count, wire.MAX_OPEN_REQUESTS)))

    def _update_health(self, now: float) -> None:
        monitor = self._health
        if self._progress_completions or self._progress_bytes:
            monitor.record_progress(now, completions=self._progress_completions,
                                    bytes_moved=self._progress_bytes)
            self._progress_completions = self._progress_bytes = 0
        health = monitor.update(now, in_flight=self._table.in_flight,
                                quarantined=self._table.quarantined)
        changed = monitor.changed
        if self._tp_error is not None:
            changed = changed or self._health_snapshot.reason != TP_GROUP_FAILED
            health = attrs.evolve(health, healthy=False, reason=TP_GROUP_FAILED)
        self._health_snapshot = health
        if not changed:
            return
        restart = self.restart_requested
        if self._log_on:
            self._log.info(
                "health.change", healthy=health.healthy, quarantined=health.quarantined,
                quarantine_budget=health.quarantine_budget,
                seconds_since_progress=round(health.seconds_since_progress, 6),
                in_flight=health.in_flight, reason=health.reason, restart_requested=restart,
            )
        if restart and self._restart_event is not None and not self._restart_event.is_set():
            self._restart_event.set()
            if self._on_restart is not None:
                self._on_restart(health)


#: ``Health.reason`` when the engine's TP group itself broke (see ``_tp_failed``).
TP_GROUP_FAILED = "tp_group_failed"


def _chunk_view(transfer: _Transfer, chunk: int) -> torch.Tensor:
    """The bytes of one chunk in the transfer's staging buffer."""
    staging = transfer.staging
    assert staging is not None
    if transfer.num_chunks == 1:
        return staging  # exactly the transfer's bytes: no slice to make per operation
    size = transfer.chunk_nbytes
    return staging[chunk * size:(chunk + 1) * size]


def _error_for(request_id: str, reason: str, detail: str | None) -> BaseException:
    if reason in (FailureReason.QUEUE_TIMEOUT.value, FailureReason.TRANSFER_TIMEOUT.value):
        return TransferTimeout(request_id, reason, detail)
    if reason == FailureReason.CANCELLED.value:
        return TransferCancelled(request_id, reason, detail)
    return TransferFailed(request_id, reason, detail)
