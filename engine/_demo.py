"""``kvhandoff demo``: a scripted walk-through of transfer session lifecycles.

Two ranks live in this process: a prefill rank that sends and a decode rank that receives.
Each has its own real ``SessionTable``, ``BlockPool`` (debug mode: freed blocks are poisoned)
and ``HealthMonitor``. A scripted link stands in for the transport: the script decides when
an operation completes, fails or stays wedged, and a completed transfer really copies the KV
blocks from the prefill pool into the decode pool. Scenes: the happy path, a cancel in each
state, a queue timeout, and a wedged link that quarantines transfers, turns health red, asks
for a restart and recovers. Every line printed is read off the real objects.

It ends with the books: every session released, every block back on both free lists, pool
``check()`` passing, every free block still poisoned. Exit code 0 only if nothing leaked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from kvhandoff.sessions import (
    CancelResult,
    Event,
    FailureReason,
    HealthMonitor,
    HealthPolicy,
    Role,
    SessionTable,
    Transition,
)

if TYPE_CHECKING:
    from kvhandoff.engine.pool import BlockPool

QUEUE_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 10.0
POLICY = HealthPolicy(quarantine_budget=1, progress_deadline_s=15.0, restart_grace_s=20.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=32, metavar="N",
                        help="KV blocks per rank (default: 32; at least 3)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the scene titles and the final books")


class _ConsoleLogger:
    """A structlog-style logger (``info(event, **keys)``) that prints key=value lines."""

    def __init__(self, say: Callable[[str], None], rank: str) -> None:
        self._say = say
        self._rank = rank

    def info(self, event: str, **keys: Any) -> None:
        fields = " ".join(f"{key}={value}" for key, value in keys.items())
        self._say(f"      {self._rank:<7} {event} {fields}")


class _LinkOp:
    """One posted operation on the scripted link: ``pending`` until the script resolves it."""

    def __init__(self, request_id: str, role: Role) -> None:
        self.request_id = request_id
        self.role = role
        self.state = "pending"

    def __repr__(self) -> str:
        return f"<{self.role.value} op {self.request_id} {self.state}>"


class _Rank:
    """One rank's real state: its sessions, its KV pool, its health."""

    def __init__(self, name: str, role: Role, pool: BlockPool, now: float) -> None:
        self.name = name
        self.role = role
        self.pool = pool
        self.table = SessionTable()
        self.monitor = HealthMonitor.start(POLICY, now)
        self.ops: dict[str, _LinkOp] = {}
        self.held: dict[str, list[int]] = {}  # blocks the host holds, by request

    @property
    def peer(self) -> int:
        return 1 if self.role is Role.SENDER else 0


class _Walkthrough:
    def __init__(self, num_blocks: int, out: TextIO, quiet: bool) -> None:
        import torch
        from kvhandoff.engine.pool import BlockPool

        self.torch = torch
        self.now = 0.0
        self.quiet = quiet
        self.out = out
        geometry = {"num_layers": 2, "block_tokens": 4, "kv_heads": 2, "head_dim": 8,
                    "dtype": torch.float32, "device": "cpu", "debug": True}
        self.prefill = _Rank("prefill", Role.SENDER, BlockPool(
            num_blocks, logger=_ConsoleLogger(self.detail, "prefill"), **geometry),
            self.now)
        self.decode = _Rank("decode", Role.RECEIVER, BlockPool(
            num_blocks, logger=_ConsoleLogger(self.detail, "decode"), **geometry),
            self.now)
        self.generator = torch.Generator().manual_seed(0)
        self.problems: list[str] = []

    # --- output ----------------------------------------------------------------------------

    def title(self, text: str) -> None:
        print(f"\n== {text}", file=self.out)

    def detail(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out)

    def show(self, rank: _Rank, request_id: str, made: tuple[Transition, ...]) -> None:
        for t in made:
            reason = f"  reason={t.failure.reason.value}" if t.failure else ""
            self.detail(f"  t={t.at:6.1f}s {rank.name:<7} {request_id:<14} "
                        f"{t.from_state.name:>11} -> {t.to_state.name:<11} "
                        f"({t.event.name}){reason}")

    # --- host and engine steps -------------------------------------------------------------

    def admit(self, rank: _Rank, request_id: str, n: int) -> list[int]:
        """The host allocates blocks; the engine pins them and opens a session."""
        block_ids = rank.pool.alloc(n, owner=request_id)
        if rank.role is Role.SENDER:  # prefill output: something to check on arrival
            for layer in rank.pool.layers:
                layer[self.torch.tensor(block_ids)] = self.torch.randn(
                    (n, *layer.shape[1:]), generator=self.generator)
        rank.pool.pin(block_ids, request_id)
        rank.table.admit(request_id, rank.role, rank.peer, block_ids, self.now,
                         queue_timeout_s=QUEUE_TIMEOUT_S, transfer_timeout_s=TRANSFER_TIMEOUT_S)
        rank.held[request_id] = block_ids
        self.detail(f"  t={self.now:6.1f}s {rank.name:<7} {request_id:<14} admitted, "
                    f"blocks {block_ids} pinned")
        return block_ids

    def apply(self, rank: _Rank, request_id: str, event: Event, **kw: Any) -> None:
        self.show(rank, request_id, rank.table.apply(request_id, event, self.now, **kw))

    def advertise(self, request_id: str) -> None:
        """The handshake: both sides now know each other's block ids."""
        for rank in (self.decode, self.prefill):
            self.apply(rank, request_id, Event.ADVERTISE)

    def post(self, rank: _Rank, request_id: str) -> None:
        op = _LinkOp(request_id, rank.role)
        rank.ops[request_id] = op
        self.apply(rank, request_id, Event.POSTED, handle=op)

    def deliver(self, request_id: str) -> None:
        """The link moves the data and both operations finish."""
        src = self.prefill.table.get(request_id).block_ids
        dst = self.decode.table.get(request_id).block_ids
        torch = self.torch
        for send_layer, recv_layer in zip(self.prefill.pool.layers, self.decode.pool.layers,
                                          strict=True):
            recv_layer[torch.tensor(dst)] = send_layer[torch.tensor(src)]
        for rank in (self.prefill, self.decode):
            self.finish_op(rank, request_id, ok=True)

    def finish_op(self, rank: _Rank, request_id: str, *, ok: bool) -> None:
        op = rank.ops.pop(request_id)
        op.state = "done" if ok else "failed"
        rank.monitor.record_progress(self.now, completions=1)
        if ok:
            self.apply(rank, request_id, Event.HANDLE_DONE)
        else:
            self.apply(rank, request_id, Event.HANDLE_FAILED,
                       reason=FailureReason.TRANSPORT_ERROR, detail="link reset")

    def cancel(self, rank: _Rank, request_id: str, *, cancellable: bool = True) -> CancelResult:
        health = rank.monitor.health
        healthy = health.healthy if health is not None else True
        session = rank.table.find(request_id)
        state = session.state.name if session is not None else "not in the table"
        seen = len(session.history) if session is not None else 0
        result = rank.table.cancel(request_id, healthy=healthy, cancellable=cancellable,
                                   now=self.now)
        self.detail(f"  t={self.now:6.1f}s {rank.name:<7} {request_id:<14} cancel() in "
                    f"{state} -> {result.name} (safe_to_free={result.safe_to_free})")
        if session is not None:
            self.show(rank, request_id, session.history[seen:])
        return result

    def host_free(self, rank: _Rank, request_id: str) -> None:
        """The host frees its blocks whenever it likes; pinned ones are deferred."""
        block_ids = rank.held.pop(request_id)
        released = rank.pool.free(block_ids, owner=request_id)
        deferred = sorted(set(block_ids) - set(released))
        self.detail(f"  t={self.now:6.1f}s {rank.name:<7} {request_id:<14} host free(): "
                    f"{len(released)} back now, {len(deferred)} deferred")

    def tick(self, seconds: float = 0.0) -> None:
        """What the engine loop does each tick, on both ranks."""
        self.now += seconds
        for rank in (self.prefill, self.decode):
            for session, made in rank.table.expire_due(self.now):
                self.show(rank, session.request_id, made)
            health = rank.monitor.update(self.now, in_flight=rank.table.in_flight,
                                         quarantined=rank.table.quarantined)
            if rank.monitor.changed:
                state = "healthy" if health.healthy else f"UNHEALTHY ({health.reason})"
                restart = ", RESTART REQUESTED" if rank.monitor.restart_requested else ""
                self.detail(f"  t={self.now:6.1f}s {rank.name:<7} health: {state}, "
                            f"quarantined {health.quarantined}/{health.quarantine_budget}, "
                            f"in flight {health.in_flight}, "
                            f"{health.seconds_since_progress:.1f}s since progress{restart}")
            for session in rank.table.pop_releasable():
                released = rank.pool.unpin_all(session.request_id)
                self.detail(f"  t={self.now:6.1f}s {rank.name:<7} {session.request_id:<14} "
                            f"released ({session.state.name}); {len(released)} deferred "
                            "blocks back on the free list")

    def expect(self, what: str, ok: bool) -> None:
        if not ok:
            self.problems.append(what)
            print(f"  !! {what}", file=self.out)

    # --- scenes ----------------------------------------------------------------------------

    def scene_happy_path(self) -> None:
        self.title("happy path: queued -> advertised -> in flight -> complete")
        rid = "req-happy"
        self.admit(self.prefill, rid, 3)
        self.admit(self.decode, rid, 3)
        self.tick(1.0)
        self.advertise(rid)
        self.tick(1.0)
        self.post(self.decode, rid)
        self.post(self.prefill, rid)
        self.tick(2.0)
        self.deliver(rid)
        for rank in (self.prefill, self.decode):
            self.apply(rank, rid, Event.COMPLETED)
        src, dst = (self.prefill.table.get(rid).block_ids, self.decode.table.get(rid).block_ids)
        same = all(
            self.torch.equal(a[self.torch.tensor(src)], b[self.torch.tensor(dst)])
            for a, b in zip(self.prefill.pool.layers, self.decode.pool.layers, strict=True))
        self.detail(f"  decode blocks {list(dst)} hold the prefill KV: {same}")
        self.expect("happy path: the KV arrived intact", same)
        self.tick(0.5)
        self.expect("cancel after release is NOT_FOUND",
                    self.cancel(self.prefill, rid) is CancelResult.NOT_FOUND)
        self.host_free(self.prefill, rid)
        self.host_free(self.decode, rid)  # decoding done

    def scene_cancel_queued(self) -> None:
        self.title("cancel while QUEUED: nobody outside saw the blocks, free at once")
        rid = "req-cq"
        self.admit(self.prefill, rid, 2)
        result = self.cancel(self.prefill, rid)
        self.expect("QUEUED cancel is CANCELLED_BEFORE_ADVERTISE",
                    result is CancelResult.CANCELLED_BEFORE_ADVERTISE)
        self.tick(0.5)
        self.host_free(self.prefill, rid)

    def scene_cancel_advertised(self) -> None:
        self.title("cancel while ADVERTISED: the peer is told, nothing was posted")
        rid = "req-ca"
        self.admit(self.prefill, rid, 2)
        self.admit(self.decode, rid, 2)
        self.advertise(rid)
        result = self.cancel(self.decode, rid)
        self.expect("ADVERTISED cancel is CANCEL_REQUESTED_IN_FLIGHT",
                    result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT)
        self.host_free(self.decode, rid)
        # the cancel travels to the peer as a failure with the reason "cancelled"
        self.apply(self.prefill, rid, Event.ABORT, reason=FailureReason.CANCELLED)
        self.tick(0.5)
        self.host_free(self.prefill, rid)

    def scene_cancel_in_flight(self) -> None:
        self.title("cancel while IN_FLIGHT: blocks stay pinned until the link lets go")
        rid = "req-cf"
        self.admit(self.prefill, rid, 2)
        self.admit(self.decode, rid, 2)
        self.advertise(rid)
        self.post(self.decode, rid)
        self.post(self.prefill, rid)
        result = self.cancel(self.decode, rid)
        self.expect("IN_FLIGHT cancel is CANCEL_REQUESTED_IN_FLIGHT",
                    result is CancelResult.CANCEL_REQUESTED_IN_FLIGHT)
        self.host_free(self.decode, rid)  # deferred: the receive is still posted
        self.apply(self.prefill, rid, Event.ABORT, reason=FailureReason.CANCELLED)
        self.tick(1.0)
        self.expect("nothing released while the operations are pending",
                    self.decode.pool.num_deferred == 2)
        self.finish_op(self.decode, rid, ok=True)  # the link honours the cancel
        self.finish_op(self.prefill, rid, ok=True)
        self.tick(0.5)
        self.host_free(self.prefill, rid)

    def scene_not_cancellable_and_finished(self) -> None:
        self.title("a transport that cannot cancel, then cancel after the end")
        rid = "req-nc"
        self.admit(self.prefill, rid, 1)
        self.admit(self.decode, rid, 1)
        self.advertise(rid)
        self.post(self.decode, rid)
        self.post(self.prefill, rid)
        result = self.cancel(self.decode, rid, cancellable=False)
        self.expect("a posted op the transport cannot cancel is NOT_CANCELLABLE",
                    result is CancelResult.NOT_CANCELLABLE)
        self.deliver(rid)
        for rank in (self.prefill, self.decode):
            self.apply(rank, rid, Event.COMPLETED)
        self.expect("cancel of a complete session is ALREADY_COMPLETE",
                    self.cancel(self.decode, rid) is CancelResult.ALREADY_COMPLETE)
        self.tick(0.5)
        self.host_free(self.prefill, rid)
        self.host_free(self.decode, rid)

    def scene_queue_timeout(self) -> None:
        self.title("queue timeout: waiting too long before advertise fails at once")
        rid = "req-qt"
        self.admit(self.decode, rid, 1)
        self.tick(QUEUE_TIMEOUT_S)
        self.host_free(self.decode, rid)

    def scene_quarantine(self) -> None:
        self.title("a wedged link: quarantine, health, restart request, recovery")
        rids = ("req-wedge-1", "req-wedge-2")
        for rid in rids:
            self.admit(self.prefill, rid, 1)
            self.admit(self.decode, rid, 1)
            self.advertise(rid)
            self.post(self.decode, rid)
            self.post(self.prefill, rid)
        self.tick(1.0)
        self.tick(TRANSFER_TIMEOUT_S)  # the link never completes: both transfers quarantine
        for rid in rids:
            self.host_free(self.decode, rid)  # the host gave up on them: frees are deferred
        result = self.cancel(self.decode, rids[0])
        self.expect("cancel while unhealthy is BACKEND_UNHEALTHY",
                    result is CancelResult.BACKEND_UNHEALTHY)
        self.tick(POLICY.progress_deadline_s)
        self.tick(POLICY.restart_grace_s)  # unhealthy longer than the grace
        self.expect("a restart is requested after the grace",
                    self.decode.monitor.restart_requested)
        for rid in rids:  # the link finally resets: the handles reach a final state
            for rank in (self.decode, self.prefill):
                self.finish_op(rank, rid, ok=False)
        self.tick(0.5)
        self.expect("health recovers once the handles are final",
                    self.decode.monitor.health is not None and self.decode.monitor.health.healthy)
        for rid in rids:
            self.host_free(self.prefill, rid)

    # --- the books -------------------------------------------------------------------------

    def books(self) -> int:
        self.title("the books")
        from kvhandoff.engine.errors import PoolError

        for rank in (self.prefill, self.decode):
            pool = rank.pool
            left = [s.request_id for s in rank.table]
            self.expect(f"{rank.name}: sessions left {left}", not left)
            self.expect(f"{rank.name}: host still holds {sorted(rank.held)}", not rank.held)
            try:
                pool.check()
                pool.assert_poisoned()
            except PoolError as error:
                self.expect(f"{rank.name}: {error}", False)
            self.expect(f"{rank.name}: {pool.num_blocks - pool.num_free} blocks leaked",
                        pool.num_free == pool.num_blocks)
            print(f"  {rank.name:<7} {pool.num_free}/{pool.num_blocks} blocks free, "
                  f"{pool.num_pinned} pinned, {pool.num_deferred} deferred, "
                  f"{len(rank.table)} sessions", file=self.out)
        if self.problems:
            print(f"  FAILED: {len(self.problems)} problem(s)", file=self.out)
            return 1
        print("  no leak: every block is back on both free lists and still poisoned",
              file=self.out)
        return 0

    def run(self) -> int:
        self.detail("kvhandoff demo: scripted session lifecycles on two in-process ranks "
                    "(the transfer engine replaces this walk-through when it lands)")
        for scene in (self.scene_happy_path, self.scene_cancel_queued,
                      self.scene_cancel_advertised, self.scene_cancel_in_flight,
                      self.scene_not_cancellable_and_finished, self.scene_queue_timeout,
                      self.scene_quarantine):
            scene()
            self.tick(0.5)
        return self.books()


NEEDED_BLOCKS = 3  # the most one rank holds at once (the happy path)


def run(args: argparse.Namespace) -> int:
    if args.blocks < NEEDED_BLOCKS:
        print(f"kvhandoff demo: --blocks must be at least {NEEDED_BLOCKS}", file=sys.stderr)
        return 2
    return _Walkthrough(args.blocks, sys.stdout, args.quiet).run()
