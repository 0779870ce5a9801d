"""``TransferEngine``: moves KV blocks between ranks, advancing only on ready futures.

Theory of operation
===================

Every request's transfer on this rank is a ``TransferSession`` (``kvhandoff.sessions``) kept
in one ``SessionTable``. The engine never decides a state itself: it turns what it observes
into session events and applies them through the table (``_apply``), so the transition table
stays the one place where states change, and any fact the session holds is asked of it.

The engine is this module (the public calls, the tick, what follows a transition, release)
and the parts it drives: ``Admission`` (``_admission.py``: validation, pins and table
entries of single and batched requests, undone when an admission fails part-way),
``ControlPlane`` (``_control.py``: the handshake, early advertises, the peer's FAIL/CANCEL,
the outgoing frames), ``DataPath`` (``_datapath.py``: posting, completions,
wind-down), ``Agreement`` (``_agreement.py``: the TP group's outcome union and quiescence
intersection, sans-I/O) and ``Leases`` (``_leases.py``: peer leases and heartbeats).

One tick of the loop (``_tick``) never blocks: it drains arrived control messages, polls
the transport for the operations that became final (so its cost grows with completions, not
with transfers in flight), expires due deadlines, checks peer leases, runs one agreement
round with the TP group (posted on every rank, every tick), releases what every rank is done
with, updates health and sends heartbeats. docs/design.md walks through the whole design.

Blocking waits exist only in ``drain()``.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
from kvhandoff import cuda_ext
from kvhandoff.collectives import CheckedComm, logging_enabled, rank_logger
from kvhandoff.engine._admission import Admission, handles_of
from kvhandoff.engine._agreement import FAILED, QUIESCENT
from kvhandoff.engine._config import EngineConfig
from kvhandoff.engine._control import ControlPlane
from kvhandoff.engine._datapath import DataPath
from kvhandoff.engine._group import GroupSync
from kvhandoff.engine._handle import (
    DrainReport,
    EngineStats,
    TransferHandle,
    TransferRequest,
    error_for,
)
from kvhandoff.engine._health import EngineHealth
from kvhandoff.engine._leases import Leases
from kvhandoff.engine._transfer import Transfer, WindDown
from kvhandoff.engine.errors import EngineClosedError, EngineConfigError, PinError
from kvhandoff.engine.pool import BlockPool
from kvhandoff.engine.transports import HandleKind, Transport
from kvhandoff.sessions import (
    OPEN_STATES,
    TERMINAL_STATES,
    CancelResult,
    Event,
    FailureReason,
    Health,
    Role,
    SessionSnapshot,
    SessionTable,
    State,
    TransferSession,
    Transition,
    UnknownSessionError,
)

__all__ = ["TransferEngine"]


class TransferEngine:
    """Moves KV blocks of ``pool`` over ``transport``; an async context manager (anyio).

    ``tp_comm`` is this rank's tensor-parallel group (a ``CheckedComm``): when given, a
    transfer completes only when every rank of the group has its shard, and blocks are
    released only when every rank's transport is done with them. The layout checked at the
    handshake is the pool's (``pool.layout``: its fields travel in the receiver's advertise,
    and a mismatch names each differing field with both values); ``layout_extra`` is added
    to its fingerprint (e.g. ``(tp_rank, tp_size)`` for a pool whose layout does not say its
    TP shard), so two ranks whose shards do not match fail the handshake with
    ``layout_mismatch`` instead of moving wrong bytes.

    The public calls (``send``, ``receive``, ``cancel``, ``health``, ``session``, ``stats``)
    never block. Use from the event loop that entered the context; not thread-safe. An
    exception raised inside ``async with engine:`` reaches the caller as itself (never
    wrapped in an exception group), after the engine drained.

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
        layout = pool.layout
        extra = tuple(layout_extra)
        if layout.tp_size > 1 and extra[:2] == (layout.tp_rank, layout.tp_size):
            raise EngineConfigError("layout_extra", layout_extra,
                                    "not the pool layout's TP shard again (pool.layout says "
                                    "it, and the fingerprint has it already)")
        # The pool's layout, once: its fingerprint (equal to the one computed from the pool's
        # shape for an NHD pool of one shard) and its encoded form for the advertise.
        self.layout_fingerprint = layout.fingerprint(extra=extra)
        self.layout_bytes = layout.encode()
        self._clock = clock
        self._num_layers = pool.num_layers
        self._log = rank_logger(self.rank)
        # Asked again at every tick and public call: ``configure_logging()`` may come after
        # the engine exists (an attribute, not a call, on the hot path).
        self._log_on = logging_enabled()
        self._table = SessionTable()
        self._transfers: dict[str, Transfer] = {}
        now = clock()
        self._leases = Leases(self.config.lease_s, self.config.heartbeat_every_s, now)
        self._control = ControlPlane(self)
        self._datapath = DataPath(self)
        self._admission = Admission(self)
        self._group = GroupSync(self, tp_comm)
        self._agreement = self._group.agreement
        self._health = EngineHealth(self.config.health_policy(), now, on_restart)
        # Released sessions (out of the table, so never changed again), snapshotted only when
        # asked for: most never are.
        self._recent: collections.OrderedDict[str, TransferSession] = collections.OrderedDict()
        self._completed = self._failed = self._cancelled = self._released = 0
        # Pins of the transfers released since the tick or public call began: removed
        # together (``BlockPool.unpin_many``) before it returns to the host.
        self._unpins: list[tuple[tuple[int, ...], str]] = []
        self._ticks = self._quarantines = 0
        self._accepting = True
        self._draining = False
        self._stopped = False
        self._wake: anyio.Event | None = None
        self._task_group: Any = None
        self._on_layer_ready = self._layer_ready  # one bound method for every handle
        # The transport's own word that a peer is gone (NIXL's probes), asked with the leases.
        self._peer_probe: Callable[[int], str | None] | None = getattr(
            transport, "peer_lost", None)


    # --- context manager ------------------------------------------------------------------

    async def __aenter__(self) -> TransferEngine:
        # The block-copy extension JIT-builds on first use (tens of seconds the first time on
        # a machine): build it in a worker thread now rather than inside the first tick, where
        # it would freeze this loop and every engine sharing it.
        await anyio.to_thread.run_sync(cuda_ext.backend, self.pool.device)
        # A transport that registers memory (NIXL) registers the pool's layers once, here,
        # rather than on the first transfer; it keeps them registered until it is closed.
        register = getattr(self.transport, "register", None)
        if callable(register):
            register(self.pool.layers)
        self._wake = anyio.Event()
        self._health.restart_event = anyio.Event()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        exc = exc_info[1]
        try:
            with anyio.CancelScope(shield=exc is not None):
                await self.drain(self.config.drain_timeout_s)
        finally:
            self._stopped = True
            self._poke()
            # Only a cancellation goes into the loop's task group (it belongs to an enclosing
            # scope); the host's own exception propagates as itself, unwrapped.
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            await self._task_group.__aexit__(*(exc_info if cancelled else (None, None, None)))
        return None

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
             layerwise: bool = False, num_tokens: int | None = None,
             metadata: bytes = b"") -> TransferHandle:
        """Send the KV of ``block_ids`` (every layer, K and V) to ``peer`` once the receiver
        there has advertised a matching ``receive``. The blocks are read when the
        receiver's advertise arrives, not at ``send()``, and stay pinned until the transfer
        is quiescent; the host may ``free()`` them at any time (the pool defers it). With
        ``layerwise=True`` each layer moves as soon as ``handle.layer_ready(i)`` was called
        and the receiver has advertised. ``num_tokens``: the tokens the blocks hold (the
        last block may be partly filled; default: every slot of every block); the
        receiver's must be the same (``size_mismatch`` otherwise). ``metadata``: at most
        ``MAX_METADATA_BYTES`` opaque bytes delivered in the receiver's ``TransferResult``
        (never interpreted, never unpickled). Do not write into the blocks after ``send()``
        (for a layer-wise send: into a layer after its ``layer_ready``) until ``wait()``
        returns: they are read whenever the receiver's advertise arrives. Bad arguments
        raise before anything changes; a transfer that fails at once returns a handle whose
        ``wait()`` raises."""
        self._log_on = logging_enabled()
        try:
            transfer = self._admission.admit(request_id, block_ids, peer, Role.SENDER,
                                             layerwise, num_tokens=num_tokens,
                                             metadata=metadata)
        except BaseException:
            self._end_call()
            raise
        handle = transfer.handle
        assert handle is not None  # made at admission; the transfer may be released below
        try:
            early = self._control.take_early(request_id, peer)
            if early is not None and not handle.done:  # else failed at admission
                self._control.on_advertise(peer, early, self._clock())
        finally:
            self._end_call()
        return handle

    def receive(self, request_id: str, block_ids: Iterable[int], peer: int, *,
                layerwise: bool = False, num_tokens: int | None = None) -> TransferHandle:
        """Receive a request's KV from ``peer`` into ``block_ids``: the receive is posted and
        advertised at once. ``layerwise`` must match the sender's (``layout_mismatch``
        otherwise), and ``num_tokens`` (default: every slot of every block) too
        (``size_mismatch``). The result carries the sender's ``metadata``. Raises
        ``DataTagsExhaustedError`` before anything changes when the transport has no free
        data tags left for it."""
        self._log_on = logging_enabled()
        chunks = self._num_layers if layerwise else 1
        self._admission.check_admissible(request_id, peer)
        first_tag = self._datapath.reserve_tags(request_id, chunks)
        try:
            transfer = self._admission.admit(request_id, block_ids, peer, Role.RECEIVER,
                                             layerwise, checked=True, num_tokens=num_tokens,
                                             data_tag=first_tag)
        except BaseException:
            if request_id not in self._transfers:  # else they go with its release
                self._datapath.free_tags(first_tag, chunks)
            self._end_call()
            raise
        handle = transfer.handle
        assert handle is not None  # made at admission; the transfer may be released below
        try:
            self._start_receive(transfer)
        finally:
            self._end_call()
        return handle

    def send_many(self, requests: Iterable[TransferRequest]) -> list[TransferHandle]:
        """``send`` for a batch of requests (``TransferRequest`` each), with the same
        semantics per request, cheaper per request: validated as a whole (no request id
        twice, each admissible, each pin possible) before anything changes, pinned
        together, and the control messages the batch causes leave as one frame per peer.
        Bad input raises before any request is admitted. Returns the handles in order."""
        self._log_on = logging_enabled()
        batch = self._admission.batch(requests, Role.SENDER)
        transfers = self._admission.admit_many(batch, Role.SENDER, checked=True)
        handles = handles_of(transfers)
        now = self._clock()
        try:
            for transfer, handle in zip(transfers, handles, strict=True):
                # Taken even when admission failed it (the TP group failed it first), as
                # ``send()`` does: a kept advertise would answer a later send of the id.
                early = self._control.take_early(transfer.request_id, transfer.peer)
                if early is not None and not handle.done:
                    self._control.on_advertise(transfer.peer, early, now)
        finally:
            self._end_call()
        return handles

    def receive_many(self, requests: Iterable[TransferRequest]) -> list[TransferHandle]:
        """``receive`` for a batch of requests (``TransferRequest`` each, no ``metadata``),
        as ``send_many`` does for sends: validated as a whole, data tags reserved and blocks
        pinned for all before any is admitted (``DataTagsExhaustedError`` and every other
        error leave everything as it was), each posted and advertised, the advertises to
        one peer in one frame. Returns the handles in order."""
        self._log_on = logging_enabled()
        batch = self._admission.batch(requests, Role.RECEIVER)
        datapath = self._datapath
        tags: list[tuple[int, int]] = []  # (first tag, count) per request
        try:
            for request in batch:
                count = self._num_layers if request.layerwise else 1
                tags.append((datapath.reserve_tags(request.request_id, count), count))
        except BaseException:
            for first, count in tags:
                datapath.free_tags(first, count)
            raise
        transfers = self._admission.admit_many(batch, Role.RECEIVER, checked=True,
                                               data_tags=[first for first, _ in tags])
        handles = handles_of(transfers)
        try:
            for transfer in transfers:
                self._start_receive(transfer)
        finally:
            self._end_call()
        return handles

    def _start_receive(self, transfer: Transfer) -> None:
        """Post an admitted receive and advertise it. Admission may already have failed it
        (the TP group failed the request first): then nothing is posted, or the transport
        could write into a staging buffer that the release hands back; the peer was told by
        the failure."""
        handle = transfer.handle
        if handle is None or handle.done:
            return
        now = self._clock()
        if self._datapath.start_receive(transfer, now):
            self._leases.engaged(transfer.peer, now)
            self._control.advertise(transfer)

    def cancel(self, request_id: str) -> CancelResult:
        """Cancel a transfer. ``result.safe_to_free`` says whether the host may free the
        blocks now; otherwise cancel was asked of the transport and the peer, ``wait()``
        raises ``TransferCancelled`` at once, and the blocks stay pinned until quiescent."""
        self._log_on = logging_enabled()
        now = self._clock()
        transfer = self._transfers.get(request_id)
        session = self._table.find(request_id)
        state = None if session is None else session.state
        cancellable = True
        if transfer is not None:
            kind = HandleKind.SEND if transfer.role is Role.SENDER else HandleKind.RECV
            # A one-sided receive is retracted instead (``DataPath.wind_down``): the cancel
            # is requested and the blocks stay pinned until the peer's answer.
            cancellable = kind in self.transport.cancellable_kinds or (
                kind is HandleKind.RECV and self.transport.one_sided)
        before = 0 if session is None else len(session.history)
        result = self._table.cancel(request_id, healthy=self._health.snapshot.healthy,
                                    cancellable=cancellable, now=now)
        if self._log_on:
            self._log.info("session.cancel", request_id=request_id,
                           state=None if state is None else state.name, result=result.name,
                           safe_to_free=result.safe_to_free)
        if transfer is not None and session is not None and result.applies_cancel:
            try:
                self._after(transfer, session.history[before:], now)
                if not transfer.outcome_known:  # IN_FLIGHT with cancel requested
                    self._surface_failure(transfer, FailureReason.CANCELLED,
                                          "cancelled by the host")
                self._datapath.wind_down(transfer, now)
            finally:
                self._end_call()
            self._poke()
        return result

    def finished(self) -> list[str]:
        """On a host-owned pool (``BlockPool.from_tensors(..., host_owned=True)``): the
        requests whose blocks became safe to reuse since the last call (every rank's
        transport is done with them), each once; the host's allocator frees them. Asks the
        pool, which reports an owner when the engine removes its last pin (at release, or
        when an admission failed). ``PoolModeError`` on a pool that defers frees itself."""
        return self.pool.finished()

    def health(self) -> Health:
        """The latest health snapshot (recomputed every tick)."""
        return self._health.snapshot

    @property
    def restart_requested(self) -> bool:
        """True while the engine has been unhealthy for longer than the grace period (a
        routine per-request timeout never asks for a restart), or its TP group broke."""
        return self._health.restart_requested

    async def wait_restart_requested(self) -> Health:
        """Return once the engine asks the host to restart it (``on_restart`` is the
        callback form)."""
        event = self._health.restart_event
        if event is None:
            raise EngineClosedError("wait_restart_requested", "use inside `async with engine`")
        await event.wait()
        return self._health.snapshot

    def session(self, request_id: str) -> SessionSnapshot:
        """A read-only snapshot of a live session, or of one of the last
        ``config.recent_sessions`` released ones; ``UnknownSessionError`` otherwise."""
        found = self._table.find(request_id) or self._recent.get(request_id)
        if found is None:
            raise UnknownSessionError(request_id)
        return found.snapshot()

    def was_released(self, request_id: str) -> bool:
        """True for one of the last ``config.recent_sessions`` released requests."""
        return request_id in self._recent

    def stats(self) -> EngineStats:
        datapath = self._datapath
        return EngineStats(
            sessions=len(self._table),
            states={state.name: count for state, count in self._table.counts().items()},
            completed=self._completed, failed=self._failed, cancelled=self._cancelled,
            bytes_sent=datapath.bytes_sent, bytes_received=datapath.bytes_received,
            ticks=self._ticks, control_rejected=self._control.rejected,
            early_advertises=self._control.early_count,
            quarantines=self._quarantines, staging_allocations=datapath.staging.allocations,
            staging_reuses=datapath.staging.reuses, agreement_rounds=self._group.rounds,
            control_frames=self._control.frames_sent,
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
        while time.monotonic() < deadline and not (not self._transfers and self._group.done):
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

    def _end_call(self) -> None:
        """The end of a public call: the TP group of one decides what the call reported,
        and the call's control messages leave now, one frame per peer (a single call's
        advertise goes out at once, as it always did; the tick sends its own at its end)."""
        try:
            self._group.settle_local()
        finally:
            self._unpin_and_flush()

    def _unpin_and_flush(self) -> None:
        """Remove the pins released and send the messages queued since the last time, the
        messages even when the unpin raises."""
        try:
            if self._unpins:
                self._unpin_released()
        finally:
            if self._control.has_outgoing:
                self._control.flush()

    def _unpin_released(self) -> None:
        """Remove the pins of the transfers released since the last call, together. Should
        one be refused (a bug), every other pin still goes, one by one, and the first
        refusal is raised after."""
        unpins, self._unpins = self._unpins, []
        try:
            self.pool.unpin_many(unpins)
        except PinError:
            first: PinError | None = None
            for block_ids, owner in unpins:
                try:
                    self.pool.unpin(block_ids, owner=owner)
                except PinError as exc:
                    first = first or exc
            if first is not None:
                raise first from None

    def _layer_ready(self, transfer: Transfer, layer: int) -> None:
        try:
            posted = self._datapath.layer_ready(transfer, layer, self._clock())
        finally:
            self._end_call()
        if posted:
            self._poke()

    # --- transitions and outcomes ----------------------------------------------------------

    def _apply(self, transfer: Transfer, event: Event, now: float, **kwargs: Any) -> None:
        # kwargs: handle, reason, detail, outcome_unknown (``SessionTable.apply``)
        self._after(transfer, self._table.apply(transfer.request_id, event, now, **kwargs),
                    now)

    def _after(self, transfer: Transfer, made: Sequence[Transition], now: float) -> None:
        """Everything that follows from transitions just made: log them, surface a failure
        (to the host, the TP group and the peer), wind down, and report quiescence."""
        if not made:
            return
        if self._log_on:
            self._log_transitions(transfer, made)
        session = transfer.session
        state = made[-1].to_state
        if made[0].to_state is State.QUARANTINED:  # only ever the first of the two
            self._quarantines += 1
        failure = session.failure
        if failure is not None:
            if not transfer.outcome_known:
                self._surface_failure(transfer, failure.reason, failure.detail,
                                      failure.outcome_unknown)
            self._datapath.wind_down(transfer, now)
        elif state is State.CANCELLED:
            if not transfer.outcome_known:
                self._surface_failure(transfer, FailureReason.CANCELLED,
                                      "cancelled before advertise")
            self._datapath.wind_down(transfer, now)
        elif session.cancel_requested:
            self._datapath.wind_down(transfer, now)
        if state in TERMINAL_STATES:  # a session reaches a terminal state only once
            if state is State.COMPLETE:
                self._completed += 1
            elif state is State.FAILED:
                self._failed += 1
            else:
                self._cancelled += 1
            self._agreement.report(transfer.request_id, QUIESCENT)

    def _surface_failure(self, transfer: Transfer, reason: FailureReason,
                         detail: str | None, outcome_unknown: bool = False) -> None:
        """Tell the host (``wait()`` raises), the TP group and the peer, each once."""
        if transfer.handle is not None:
            transfer.handle._settle(None, error_for(transfer.request_id, reason, detail,
                                                    outcome_unknown))
        self._agreement.report(transfer.request_id, FAILED, reason, detail)
        self._control.tell_failure(transfer, reason, detail)

    def _log_transitions(self, transfer: Transfer, made: Iterable[Transition]) -> None:
        if not self._log_on:
            return
        for t in made:
            self._log.info(
                "session.transition", request_id=transfer.request_id,
                role=transfer.role.value, peer=transfer.peer, from_state=t.from_state.name,
                to_state=t.to_state.name, trigger=t.event.name,
                reason=None if t.failure is None else t.failure.reason.value,
                outcome_unknown=None if t.failure is None else t.failure.outcome_unknown,
            )

    # --- release ----------------------------------------------------------------------------

    def _release(self, transfer: Transfer) -> None:
        rid = transfer.request_id
        if rid not in self._transfers or self._transfers[rid] is not transfer:
            return  # released already
        session = self._table.release(rid)
        del self._transfers[rid]
        self._released += 1
        self._leases.closed(transfer.peer, rid)
        self._agreement.forget(rid)
        # Unpinned with the others released in the same tick or call (``_unpin_released``).
        self._unpins.append((transfer.block_ids, rid))
        self._datapath.release(transfer)
        # Cutting the transfer -> handle link breaks the cycle, so a released record is freed
        # at once instead of by the cyclic collector.
        transfer.handle = None
        if self.config.recent_sessions:
            self._recent[rid] = session
            while len(self._recent) > self.config.recent_sessions:
                self._recent.popitem(last=False)

    # --- the tick -------------------------------------------------------------------------------

    def _tick(self) -> bool:
        """One pass of the loop; True when it did something (the loop then yields instead
        of sleeping). Never blocks. Whatever happens in it, the pins of the transfers it
        released go and the messages it queued leave before it returns."""
        try:
            return self._tick_body()
        finally:
            self._unpin_and_flush()  # the tick's messages: one frame per peer

    def _tick_body(self) -> bool:
        now = self._clock()
        self._ticks += 1
        self._log_on = logging_enabled()
        busy = False
        transport, control, datapath = self.transport, self._control, self._datapath
        for source, payload in transport.recv_control():
            busy = True
            control.on_message(source, payload, now)
        for op in transport.poll():
            busy = True
            datapath.on_op_final(op, now)
        for session, made in self._table.expire_due(now):
            busy = True
            transfer = self._transfers[session.request_id]
            transfer.wind_down = WindDown.ABORT  # past the deadline: presumed wedged, cancel
            self._after(transfer, made, now)
        if datapath.has_aborts_due:
            busy = datapath.abort_due(now) or busy
        if control.has_early:
            control.expire_early(now)
        if self._leases.any_open:
            self._check_leases(now)
        if self._agreement.has_unsettled:
            self._group.expire_unsettled(now)
        busy = self._group.round(now, idle=self._draining and not self._transfers) or busy
        self._group.settle_local()
        if self._unpins:  # before the health update, whose restart callback is the host's
            self._unpin_released()
        self._health.update(now, in_flight=self._table.in_flight,
                            quarantined=self._table.quarantined,
                            completions=datapath.progress_completions,
                            bytes_moved=datapath.progress_bytes,
                            group_broken=self._group.broken is not None,
                            log=self._log if self._log_on else None)
        datapath.progress_completions = datapath.progress_bytes = 0
        if self._leases.heartbeat_due(now):
            for peer, sequence, count in self._leases.heartbeats(now, control.early_sources):
                control.heartbeat(peer, sequence, count)
        return busy

    def _check_leases(self, now: float) -> None:
        for _, why, rids in self._leases.lapsed(now, self._peer_probe):
            for rid in rids:
                transfer = self._transfers.get(rid)
                if transfer is not None and transfer.state in OPEN_STATES \
                        and not transfer.outcome_known:
                    transfer.peer_told = True  # nobody there to tell
                    transfer.wind_down = WindDown.ABORT
                    # A sender that posted may have delivered every byte: it cannot know.
                    self._apply(transfer, Event.ABORT, now, reason=FailureReason.PEER_LOST,
                                detail=why[:256],
                                outcome_unknown=transfer.role is Role.SENDER
                                and bool(transfer.posted))
