"""A hypothesis state machine over SessionTable + BlockPool + HealthMonitor.

Random admissions, advertises, posts, ready / failed handles, peer aborts, expiries (time
moving on), cancels, host frees and releases, with a "transport" that writes into receiver
blocks while their handle is pending. Invariants after every step: the pool's books hold, no
block of a live session is on the free list, nothing wrote a freed block, the table's counts
and per-state data are consistent; cancel results match the cancel table of docs/design.md;
health flips exactly when the policy says. At the end every session is driven to a terminal
state and released: nothing may leak.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from kvhandoff.engine import BlockPool
from kvhandoff.sessions import (
    TRANSITIONS,
    CancelResult,
    DuplicateSessionError,
    Event,
    FailureReason,
    HealthMonitor,
    HealthPolicy,
    Role,
    SessionTable,
    State,
    TransitionError,
)

NUM_BLOCKS = 24
# Small numbers so that unhealthy windows, restarts and recoveries all happen in 40 steps.
POLICY = HealthPolicy(quarantine_budget=1, progress_deadline_s=4.0, restart_grace_s=6.0)
# Binary fractions land exactly on deadlines; arbitrary floats land anywhere.
TIME_STEPS = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0, 6.0]),
                       st.floats(min_value=0.0, max_value=12.0))
TIMEOUTS = st.one_of(st.none(), st.floats(min_value=1.0, max_value=30.0))
FAILURE_REASONS = st.sampled_from(list(FailureReason))


class Handle:
    """What a transport would hand back; sessions never look inside."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


def expected_cancel(state: State | None, healthy: bool, cancellable: bool) -> CancelResult:
    """the cancel table of docs/design.md, written independently of the implementation."""
    if state is None:
        return CancelResult.NOT_FOUND
    if state in (State.COMPLETE, State.FAILED, State.CANCELLED):
        return CancelResult.ALREADY_COMPLETE
    if state is State.QUEUED:
        return CancelResult.CANCELLED_BEFORE_ADVERTISE
    if not healthy:
        return CancelResult.BACKEND_UNHEALTHY
    if state in (State.IN_FLIGHT, State.QUARANTINED) and not cancellable:
        return CancelResult.NOT_CANCELLABLE
    return CancelResult.CANCEL_REQUESTED_IN_FLIGHT


class SessionsAndPool(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.table = SessionTable()
        self.pool = BlockPool(NUM_BLOCKS, num_layers=1, block_tokens=2, kv_heads=1, head_dim=4,
                              dtype=torch.float32, debug=True)
        self.monitor = HealthMonitor.start(POLICY, 0.0)
        self.next_id = 0
        self.host_blocks: dict[str, list[int]] = {}  # allocated, not yet freed by the host
        self.session_blocks: dict[str, list[int]] = {}  # pinned by a session not yet released
        # the health model: when progress last happened, when work began, since when unhealthy
        self.last_progress = 0.0
        self.busy = False
        self.busy_since = 0.0
        self.unhealthy_since: float | None = None
        self.healthy = True
        self.unhealthy_cancels = 0
        self.longest_unhealthy = 0.0

    # --- helpers ---------------------------------------------------------------------------

    def ids_in(self, *states: State) -> list[str]:
        return sorted(s.request_id for s in self.table if s.state in states)

    def pending_handles(self) -> list[str]:
        return sorted(
            s.request_id for s in self.table
            if s.state in (State.IN_FLIGHT, State.QUARANTINED) and not s.local_final
        )

    def progress(self) -> None:
        self.monitor.record_progress(self.now, completions=1)
        self.last_progress = self.now

    def transport_touches(self, request_id: str) -> None:
        """The transport moves data: a receiver's blocks are written (a freed block would
        lose its poison and the invariant would catch it), a sender's are read."""
        session = self.table.get(request_id)
        index = torch.tensor(session.block_ids)
        for layer in self.pool.layers:
            if session.role is Role.RECEIVER:
                layer[index] = 1.0
            else:
                assert not torch.isnan(layer[index]).any(), "sender read a freed block"

    # --- rules -----------------------------------------------------------------------------

    @rule(n=st.integers(1, 3), role=st.sampled_from(list(Role)), queue_timeout=TIMEOUTS,
          transfer_timeout=TIMEOUTS,
          start=st.sampled_from([State.QUEUED, State.ADVERTISED, State.IN_FLIGHT]))
    def admit(self, n: int, role: Role, queue_timeout: float | None,
              transfer_timeout: float | None, start: State) -> None:
        """Admit a request; ``start`` walks it on at once (so that 40 steps reach far)."""
        if self.pool.num_free < n:
            return
        request_id = f"r{self.next_id}"
        self.next_id += 1
        block_ids = self.pool.alloc(n, owner=request_id)
        for layer in self.pool.layers:  # the host fills its blocks (prefill output)
            layer[torch.tensor(block_ids)] = 0.0
        self.table.admit(request_id, role, 1, block_ids, self.now,
                         queue_timeout_s=queue_timeout, transfer_timeout_s=transfer_timeout)
        self.pool.pin(block_ids, request_id)
        self.host_blocks[request_id] = block_ids
        self.session_blocks[request_id] = block_ids
        if start is not State.QUEUED:
            self.table.apply(request_id, Event.ADVERTISE, self.now)
        if start is State.IN_FLIGHT:
            self.table.apply(request_id, Event.POSTED, self.now, handle=Handle(request_id))

    @precondition(lambda self: len(self.table) > 0)
    @rule(data=st.data())
    def admit_duplicate(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(s.request_id for s in self.table)))
        before = len(self.table)
        with pytest.raises(DuplicateSessionError):
            self.table.admit(request_id, Role.SENDER, 0, [0], self.now)
        assert len(self.table) == before

    @precondition(lambda self: self.ids_in(State.QUEUED))
    @rule(data=st.data())
    def advertise(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self.ids_in(State.QUEUED)))
        self.table.apply(request_id, Event.ADVERTISE, self.now)

    @precondition(lambda self: self.ids_in(State.ADVERTISED))
    @rule(data=st.data())
    def post(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self.ids_in(State.ADVERTISED)))
        self.table.apply(request_id, Event.POSTED, self.now, handle=Handle(request_id))
        assert self.table.get(request_id).handle is not None

    @precondition(lambda self: self.pending_handles())
    @rule(data=st.data())
    def handle_ready(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self.pending_handles()))
        self.transport_touches(request_id)
        self.table.apply(request_id, Event.HANDLE_DONE, self.now)
        self.progress()

    @precondition(lambda self: self.pending_handles())
    @rule(data=st.data(), reason=FAILURE_REASONS)
    def handle_failed(self, data: st.DataObject, reason: FailureReason) -> None:
        request_id = data.draw(st.sampled_from(self.pending_handles()))
        self.transport_touches(request_id)
        before = self.table.get(request_id).failure
        made = self.table.apply(request_id, Event.HANDLE_FAILED, self.now, reason=reason)
        session = self.table.get(request_id)
        assert session.state is State.FAILED and made[-1].to_state is State.FAILED
        assert session.failure is not None
        assert session.failure.reason is (before.reason if before else reason)
        self.progress()

    @precondition(lambda self: any(s.local_final for s in self.table
                                   if s.state is State.IN_FLIGHT))
    @rule(data=st.data())
    def group_completed(self, data: st.DataObject) -> None:
        ready = sorted(s.request_id for s in self.table
                       if s.state is State.IN_FLIGHT and s.local_final)
        request_id = data.draw(st.sampled_from(ready))
        self.confirm(request_id)
        self.table.apply(request_id, Event.COMPLETED, self.now)

    def confirm(self, request_id: str) -> None:
        """A sender completes only on its receiver's word (DONE)."""
        session = self.table.get(request_id)
        if session.role is Role.SENDER and not session.confirmed:
            self.table.apply(request_id, Event.CONFIRMED, self.now)

    @precondition(lambda self: len(self.table) > 0)
    @rule(data=st.data(), reason=FAILURE_REASONS)
    def peer_aborts(self, data: st.DataObject, reason: FailureReason) -> None:
        request_id = data.draw(st.sampled_from(sorted(s.request_id for s in self.table)))
        session = self.table.get(request_id)
        state, snapshot = session.state, (session.data, session.history)
        pending = session.handle is not None and not session.local_final
        if Event.ABORT not in TRANSITIONS[state]:
            with pytest.raises(TransitionError):
                self.table.apply(request_id, Event.ABORT, self.now, reason=reason)
            assert (session.data, session.history) == snapshot
            return
        self.table.apply(request_id, Event.ABORT, self.now, reason=reason)
        # failure with a pending handle is a quarantine; without one it is final at once
        expected = State.QUARANTINED if pending else State.FAILED
        assert session.state is expected

    @rule(dt=TIME_STEPS)
    def time_passes(self, dt: float) -> None:
        self.now += dt
        due = {s.request_id: s.state for s in self.table
               if s.deadline is not None and s.deadline <= self.now}
        expired = self.table.expire_due(self.now)
        assert {s.request_id for s, _ in expired} == set(due)
        for session, made in expired:
            assert made[0].event is Event.EXPIRE and made[0].from_state is due[session.request_id]
            reason = (FailureReason.QUEUE_TIMEOUT if made[0].from_state is State.QUEUED
                      else FailureReason.TRANSFER_TIMEOUT)
            assert session.failure is not None and session.failure.reason is reason

    @rule(nbytes=st.integers(0, 1 << 20))
    def bytes_move(self, nbytes: int) -> None:
        self.monitor.record_progress(self.now, bytes_moved=nbytes)
        if nbytes:
            self.last_progress = self.now

    @rule(data=st.data(), cancellable=st.booleans(),
          unknown=st.sampled_from([False] * 7 + [True]))
    def cancel(self, data: st.DataObject, cancellable: bool, unknown: bool) -> None:
        known = sorted(s.request_id for s in self.table)
        request_id = "never-admitted" if unknown or not known else data.draw(
            st.sampled_from(known))
        session = self.table.find(request_id)
        state = None if session is None else session.state
        result = self.table.cancel(request_id, healthy=self.healthy, cancellable=cancellable,
                                   now=self.now)
        assert result is expected_cancel(state, self.healthy, cancellable)
        event(f"cancel {None if state is None else state.name} -> {result.name}")
        if not self.healthy and state is not None:
            self.unhealthy_cancels += 1
        if result.safe_to_free:  # then nothing outside may touch the blocks any more
            assert session is None or (session.is_terminal and session.quiescent)
        if result is CancelResult.CANCELLED_BEFORE_ADVERTISE:
            assert session is not None and session.state is State.CANCELLED

    @precondition(lambda self: self.host_blocks)
    @rule(data=st.data())
    def host_frees(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.host_blocks)))
        block_ids = self.host_blocks.pop(request_id)
        released = self.pool.free(block_ids, owner=request_id)
        if request_id in self.session_blocks:  # still pinned by its session: deferred
            assert released == []
        else:
            assert released == block_ids

    @rule()
    def release(self) -> None:
        for session in self.table.pop_releasable():
            assert session.is_terminal and session.quiescent and session.handle is None
            request_id = session.request_id
            released = self.pool.unpin_all(request_id)
            blocks = self.session_blocks.pop(request_id)
            assert released == (sorted(blocks) if request_id not in self.host_blocks else [])
            assert self.table.cancel(request_id, healthy=True, cancellable=True,
                                     now=self.now) is CancelResult.NOT_FOUND

    # --- health ----------------------------------------------------------------------------

    @invariant()
    def health_follows_the_policy(self) -> None:
        """Feeds the monitor after every step (as the engine does each tick) and compares
        with the policy evaluated here."""
        in_flight, quarantined = self.table.in_flight, self.table.quarantined
        health = self.monitor.update(self.now, in_flight=in_flight, quarantined=quarantined)
        busy = in_flight > 0
        if busy and not self.busy:
            self.busy_since = self.now
        self.busy = busy
        since = self.now - max(self.last_progress, self.busy_since) if busy else 0.0
        unhealthy = (busy and since > POLICY.progress_deadline_s) or (
            quarantined > POLICY.quarantine_budget)
        assert health.healthy is not unhealthy
        assert health.seconds_since_progress == pytest.approx(max(since, 0.0))
        assert (health.in_flight, health.quarantined) == (in_flight, quarantined)
        if unhealthy and self.unhealthy_since is None:
            self.unhealthy_since = self.now
        elif not unhealthy:
            self.unhealthy_since = None
        restart = (self.unhealthy_since is not None
                   and self.now - self.unhealthy_since > POLICY.restart_grace_s)
        assert self.monitor.restart_requested is restart
        self.healthy = health.healthy
        event(f"health reason {health.reason}, restart {restart}")
        if self.unhealthy_since is not None:
            self.longest_unhealthy = max(self.longest_unhealthy, self.now - self.unhealthy_since)

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def pool_books_hold_and_live_blocks_stay_pinned(self) -> None:
        self.pool.check()
        for request_id, block_ids in self.session_blocks.items():
            for block_id in block_ids:
                assert not self.pool.is_free(block_id)
                assert request_id in self.pool.pins(block_id)
        self.pool.assert_poisoned()  # nothing wrote a block after it was freed

    @invariant()
    def table_counts_and_state_data_agree(self) -> None:
        recount: dict[State, int] = dict.fromkeys(State, 0)
        for session in self.table:
            recount[session.state] += 1
            if session.state in (State.IN_FLIGHT, State.QUARANTINED):
                assert session.state is State.QUARANTINED or session.handle is not None
            else:
                assert session.handle is None
            if session.state is State.QUARANTINED:
                assert not session.quiescent  # a quiescent quarantine settles at once
            assert (session.failure is not None) == (
                session.state in (State.QUARANTINED, State.FAILED))
        assert recount == self.table.counts()
        assert set(self.table.releasable()) == {
            s.request_id for s in self.table if s.is_terminal
        }

    # --- the end: no leak ------------------------------------------------------------------

    def teardown(self) -> None:
        # Steer the search towards long unhealthy windows and cancels made during them.
        target(self.longest_unhealthy, label="seconds unhealthy")
        target(float(self.unhealthy_cancels), label="cancels while unhealthy")
        for session in list(self.table):
            request_id = session.request_id
            if session.state in (State.QUEUED, State.ADVERTISED):
                self.table.cancel(request_id, healthy=True, cancellable=True, now=self.now)
            if session.state in (State.IN_FLIGHT, State.QUARANTINED) and not session.local_final:
                self.table.apply(request_id, Event.HANDLE_DONE, self.now)
            if session.state is State.IN_FLIGHT:
                self.confirm(request_id)
                self.table.apply(request_id, Event.COMPLETED, self.now)
            assert session.is_terminal
        self.release()
        assert len(self.table) == 0 and not self.session_blocks
        for request_id, block_ids in list(self.host_blocks.items()):
            assert self.pool.free(block_ids, owner=request_id) == block_ids
        self.pool.check()
        assert self.pool.num_free == NUM_BLOCKS
        assert self.pool.num_pinned == self.pool.num_deferred == self.pool.num_allocated == 0
        self.pool.assert_poisoned()


SessionsAndPool.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_stateful_sessions_and_pool_never_leak_or_free_early = SessionsAndPool.TestCase
