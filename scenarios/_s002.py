"""Seed 002 (TensorRT-LLM PR 13796): a status poll that blocks on an unready transfer future,
and a host that frees KV blocks while the transfer is still in flight.

Four ranks: prefill ranks 0 and 1 each send ``REQUESTS`` requests to decode ranks 2 and 3
(0 -> 2 and 1 -> 3, two links), over in-process loopback endpoints (embedded) or the real
``MPITransport`` between the processes of ``mpiexec -n 4``. The seed picks one link and two
consecutive requests on it whose data operations the link wedges (``WedgedTransport`` on the
prefill side: the sends are held back, not posted, until the link recovers, so their bytes
move late); the prefill rank logs each fault it injected (``fault.injected``). The steps of
the story that span ranks (every end posted; every host freed; the link recovered) are
ordered by a barrier of the scenario's own, never by sleeping.

Unsafe (written here, no engine): each host's status poll calls ``wait()`` on each transfer
in turn, like ``future.get()`` on an unready future. On the wedged link both ends freeze on
the first stuck request while the later ones already finished; the other link's ranks
report everything. After ``BOUND_S`` each host's watchdog logs where its loop is stuck
(``host.stalled``: the call and the site, read from the poll thread's own stack), and the
naive timeout path frees every request's blocks at once (``host.free``, ``pending`` when its
operation was not final); the prefill host hands the freed blocks to its next requests at
once and writes their KV into them. Then the link recovers: the held sends are posted for
real and carry the reused blocks' bytes into the decode blocks freed under them - a real
write, by the transport, into memory the decode host no longer owns. The decode host's next
allocation runs the pool's poison check (``BlockPool(debug=True)``), which raises
``PoisonError`` naming those blocks (logged as ``host.poisoned``), and a byte check finds
the sender's next requests' KV in them.

Safe (``TransferEngine`` on every rank): the other transfers on both links complete while
two are wedged; each stuck ``wait()`` raises within the transfer timeout on both ends
(``TransferTimeout`` on one, no freeze); the sender's sessions are quarantined, so the host's
free of their blocks is deferred while the transport may still read them; two quarantines
over a budget of 1 make the sender unhealthy, and it recovers once the link recovers and the
deferred frees are released; the decode blocks were never written after their free; no
engine ever asks for a restart. ``kvhandoff analyze`` finds the stalls, the early frees and
the late write in the unsafe logs (exit 1), and in the safe logs only the injected fault and
what it explains (exit 0).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any

from kvhandoff.scenarios._runner import (
    WORLD,
    Outcome,
    Verdict,
    _wait_polling,
    describe,
    exc_outcome,
    hung_lines,
    mpi_watchdog,
    run_threads,
    short_site,
)

REQUESTS = 5
PAIRS = WORLD // 2
# The unsafe host's watchdog bound on its status poll.
BOUND_S = 1.0
TRANSFER_TIMEOUT_S = 1.0
# Whole-run bound per rank: only reached when something is broken (then it says where).
RANK_BOUND_S = 30.0
# What the prefill host writes into the blocks it hands to its next request.
NEXT_VALUE = 99.0
NEXT_OWNER = "next-requests"
SAFE_MODES = ("fixed",)


@dataclass(frozen=True)
class Plan:
    """What the seed decides: the link (``pair``: prefill rank ``pair`` to decode rank
    ``pair + 2``) and the two consecutive requests on it (``stuck``) whose operations it
    wedges (two: one over the safe engine's quarantine budget of 1)."""

    pair: int
    stuck: tuple[int, int]

    @staticmethod
    def of(seed: int) -> Plan:
        # Never the last requests: a later one is what the frozen poll never reports.
        first = (seed // PAIRS) % (REQUESTS - 2)
        return Plan(pair=seed % PAIRS, stuck=(first, first + 1))

    @staticmethod
    def request_id(pair: int, index: int) -> str:
        return f"p{pair}-req-{index}"

    @property
    def stuck_ids(self) -> list[str]:
        return [self.request_id(self.pair, index) for index in self.stuck]


@dataclass(frozen=True)
class Role:
    rank: int

    @property
    def prefill(self) -> bool:
        return self.rank < PAIRS

    @property
    def pair(self) -> int:
        return self.rank % PAIRS

    @property
    def peer(self) -> int:
        return self.rank + PAIRS if self.prefill else self.rank - PAIRS

    @property
    def name(self) -> str:
        return "prefill" if self.prefill else "decode"


def _value(pair: int, index: int) -> float:
    """What request ``index`` of link ``pair`` carries in every element of its block."""
    return 1.0 + 10.0 * pair + index


def _pool(log: Any) -> Any:
    import torch
    from kvhandoff.engine import BlockPool

    return BlockPool(2 * REQUESTS, 1, 4, 2, 8, dtype=torch.float32, debug=True, logger=log)


# --------------------------------------------------------------------------- cross-rank steps


class _ThreadBarrier:
    """Embedded unsafe: the ranks are threads."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties)

    def wait(self) -> None:
        self._barrier.wait(RANK_BOUND_S)


class _LoopBarrier:
    """Embedded safe: the ranks are tasks of one event loop, which keeps running."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived = 0
        self._event: Any = None

    async def arrive(self) -> None:
        import anyio

        if self._event is None:
            self._event = anyio.Event()
        event = self._event
        self._arrived += 1
        if self._arrived == self._parties:
            self._arrived, self._event = 0, None
            event.set()
        await event.wait()


class _MPIBarrier:
    """Under MPI, on a communicator of the scenario's own; polled, so that a waiting rank's
    other threads (its status poll) and its event loop (its engine) keep running."""

    def __init__(self, comm: Any) -> None:
        self._comm = comm

    def wait(self) -> None:
        _wait_polling(self._comm.Ibarrier())

    async def arrive(self) -> None:
        import anyio

        request = self._comm.Ibarrier()
        while not request.Test():
            await anyio.sleep(0.001)


# --------------------------------------------------------------------------- unsafe


def _stuck_site(thread: threading.Thread, code: CodeType) -> str:
    """Where ``thread`` is inside the function of ``code``: the line its own stack is at."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    if frame is None:
        return "unknown (the thread moved on)"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"


def unsafe_rank(rank: int, transport: Any, barrier: Any, seed: int,
                where: dict[str, str]) -> Outcome:
    """One rank's naive host: post, poll by blocking waits, free on timeout (see the module
    doc). ``where`` is kept up to date for the run's watchdog."""
    from kvhandoff.collectives import rank_logger
    from kvhandoff.engine import PoisonError
    from kvhandoff.scenarios._wedged import WedgedTransport

    plan, role, log = Plan.of(seed), Role(rank), rank_logger(rank)
    wedged = role.pair == plan.pair
    pool = _pool(log)
    link = WedgedTransport(transport) if role.prefill else transport
    ids = [plan.request_id(role.pair, index) for index in range(REQUESTS)]
    blocks = {rid: pool.alloc(1, owner=rid) for rid in ids}
    handles = []
    where["at"] = "posting"
    for index, rid in enumerate(ids):
        buf = pool.key(0)[blocks[rid][0]]
        if role.prefill:
            buf.fill_(_value(role.pair, index))
            hold = wedged and index in plan.stuck
            link.hold_new = hold
            handles.append(link.post_send(buf, role.peer, index + 1))
            link.hold_new = False
            if hold:
                log.warning("fault.injected", request_id=rid, fault="wedged", peer=role.peer,
                            detail="the link holds this request's send until it recovers")
        else:
            handles.append(link.post_recv(buf, role.peer, index + 1))

    where["at"] = "barrier: every host has posted"
    barrier.wait()  # the poll's bound starts when every transfer has both its ends posted

    reported: list[int] = []
    poll_at: dict[str, Any] = {"call": "before its first wait", "request_id": None}

    def status_poll() -> None:
        """The naive poll: wait() on each transfer in turn, like future.get()."""
        for index, handle in enumerate(handles):
            poll_at.update(call=f"wait() on {ids[index]}'s {handle.kind.value}",
                           request_id=ids[index])
            handle.wait()  # blocks while this transfer is unready
            reported.append(index)

    where["at"] = "status poll"
    poll = threading.Thread(target=status_poll, name=f"s002-status-poll-{rank}", daemon=True)
    poll.start()
    poll.join(BOUND_S)
    out: Outcome = {"kind": "ok", "text": "", "rank": rank, "stalled": poll.is_alive()}
    if out["stalled"]:
        site = _stuck_site(poll, status_poll.__code__)
        log.error("host.stalled", request_id=poll_at["request_id"], call=poll_at["call"],
                  site=site, bound_s=BOUND_S)
        out.update(call=poll_at["call"], request_id=poll_at["request_id"], site=site)
    out["unreported"] = [ids[i] for i, h in enumerate(handles) if h.final and i not in reported]

    # The naive timeout path: every request is given up on now, its blocks freed at once.
    freed_pending: dict[str, list[int]] = {}
    for index, rid in enumerate(ids):
        pending = not handles[index].final
        log.info("host.free", request_id=rid, block_ids=sorted(blocks[rid]), pending=pending)
        pool.free(blocks[rid], owner=rid)
        if pending:
            freed_pending[rid] = blocks[rid]
    out["freed_pending"] = freed_pending
    if role.prefill:  # the next requests take the free blocks at once and write their KV
        reused = pool.alloc(pool.num_free, owner=NEXT_OWNER)
        for block in reused:
            pool.key(0)[block].fill_(NEXT_VALUE)
        out["reused"] = sorted(set(reused) & {b for ids_ in freed_pending.values()
                                              for b in ids_})

    where["at"] = "barrier: every host has freed"
    barrier.wait()
    if role.prefill and wedged:
        link.recover()  # the held send is posted now: its bytes move late
    where["at"] = "waiting for the status poll to return"
    poll.join(RANK_BOUND_S)
    out["poll_returned"] = not poll.is_alive()
    if not role.prefill:
        where["at"] = "allocating for the next requests"
        try:
            pool.alloc(pool.num_free, owner=NEXT_OWNER)
        except PoisonError as exc:
            log.error("host.poisoned", block_ids=list(exc.block_ids), owner=NEXT_OWNER,
                      error=describe(exc))
            out["poisoned"] = list(exc.block_ids)
            out["poison_error"] = describe(exc)
            # The byte check: what the late write left in those blocks, every element.
            out["late_bytes"] = pool.key(0)[list(exc.block_ids)].unique().tolist()
    where["at"] = "done"
    return out


def judge_unsafe(plan: Plan, outcomes: dict[int, Outcome]) -> Verdict:
    failed = {r: o for r, o in outcomes.items() if o["kind"] != "ok"}
    if failed or len(outcomes) != WORLD:
        return Verdict(False, [f"rank {r}: {o['text']}" for r, o in sorted(failed.items())]
                       or [f"outcomes from ranks {sorted(outcomes)} only"])
    sender, receiver = plan.pair, plan.pair + PAIRS
    others = [r for r in range(WORLD) if r not in (sender, receiver)]
    first, names = plan.stuck_ids[0], " and ".join(plan.stuck_ids)
    lines = []
    frozen = all(outcomes[r]["stalled"] and outcomes[r]["request_id"] == first
                 for r in (sender, receiver))
    lines.append(f"frozen: the status polls of ranks {sender} and {receiver} were still blocked "
                 f"after the {BOUND_S:g} s bound (the link wedges {names})" if frozen
                 else f"expected ranks {sender} and {receiver} to freeze on {first}")
    unreported = True
    for rank in (sender, receiver):
        o = outcomes[rank]
        if o["stalled"]:
            unreported = unreported and bool(o["unreported"])
            lines.append(f"  rank {rank} ({Role(rank).name}): {o['call']} at "
                         f"{short_site(o['site'])}; finished but never reported: "
                         f"{', '.join(o['unreported']) or 'none'}")
    calm = all(not outcomes[r]["stalled"] and not outcomes[r]["freed_pending"] for r in others)
    lines.append(f"  ranks {others[0]}, {others[1]} (the other link): every transfer reported"
                 if calm else f"  expected ranks {others} to report every transfer")
    freed = {r: outcomes[r]["freed_pending"] for r in (sender, receiver)}
    early = all(sorted(freed[r]) == plan.stuck_ids for r in (sender, receiver))
    lost = sorted(b for blocks in freed[receiver].values() for b in blocks)
    reused = outcomes[sender].get("reused", [])
    poisoned = outcomes[receiver].get("poisoned")
    late = (poisoned == lost and bool(lost)
            and outcomes[receiver].get("late_bytes") == [NEXT_VALUE])
    if early:
        lines.append(f"early free: the hosts freed the blocks of {names} on timeout with their "
                     f"transfers pending (rank {sender}: {sorted(reused)}, handed at once to its "
                     f"next requests; rank {receiver}: {lost})")
    else:
        lines.append(f"expected both hosts to free the blocks of {names} with their transfers "
                     f"pending, got {freed}")
    if late:
        lines.append(f"late write: the link recovered and the held sends carried rank {sender}'s "
                     f"reused blocks into rank {receiver}'s freed blocks {lost} (every element "
                     f"now {NEXT_VALUE:g}: the sender's next requests' KV)")
        lines.append(f"  caught by the pool's poison check on rank {receiver}'s next alloc: "
                     f"{outcomes[receiver]['poison_error'][:120]}")
    else:
        lines.append(f"expected the poison check to catch a late write into {lost}, got "
                     f"{poisoned} ({outcomes[receiver].get('late_bytes')})")
    returned = all(o["poll_returned"] for o in outcomes.values())
    if not returned:
        lines.append("a status poll never returned after the link recovered")
    return Verdict(frozen and unreported and calm and early and late and returned, lines)


# --------------------------------------------------------------------------- safe


def _config() -> Any:
    from kvhandoff.engine import EngineConfig

    # A budget of 1 and two wedged requests: health goes unhealthy, then recovers.
    return EngineConfig(queue_timeout_s=5.0, transfer_timeout_s=TRANSFER_TIMEOUT_S,
                        lease_s=10.0, drain_timeout_s=2.0, agreement_timeout_s=5.0,
                        quarantine_budget=1, progress_deadline_s=30.0, restart_grace_s=30.0)


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    import anyio

    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.002)
        return True
    return False


async def safe_rank(rank: int, transport: Any, barrier: Any, seed: int,
                    where: dict[str, str]) -> Outcome:
    """One rank's host on a ``TransferEngine`` (see the module doc)."""
    from kvhandoff.collectives import rank_logger
    from kvhandoff.engine import PoisonError, TransferEngine, TransferError, TransferTimeout
    from kvhandoff.scenarios._wedged import WedgedTransport

    plan, role, log = Plan.of(seed), Role(rank), rank_logger(rank)
    wedged = role.pair == plan.pair
    pool = _pool(log)
    link = WedgedTransport(transport) if role.prefill else transport
    out: Outcome = {"kind": "ok", "text": "", "rank": rank, "wedged": wedged}
    restarts = []
    async with TransferEngine(pool, link, config=_config()) as engine:
        stuck: dict[str, tuple[Any, list[int]]] = {}
        for index, rid in zip(plan.stuck, plan.stuck_ids, strict=True) if wedged else ():
            where["at"] = f"starting {rid}"
            blocks = pool.alloc(1, owner=rid)
            if role.prefill:
                pool.key(0)[blocks[0]].fill_(_value(role.pair, index))
                link.hold_new = True
                stuck[rid] = (engine.send(rid, blocks, role.peer), blocks)
                held = await _until(lambda: link.held == len(stuck))
                out["held"] = out.get("held", True) and held
                link.hold_new = False
                log.warning("fault.injected", request_id=rid, fault="wedged", peer=role.peer,
                            detail="the link holds this request's send until it recovers")
            else:
                stuck[rid] = (engine.receive(rid, blocks, role.peer), blocks)
        where["at"] = "barrier: the stuck operations are wedged"
        await barrier.arrive()

        where["at"] = "the other transfers"
        started, done, good = time.monotonic(), 0, 0
        for index in range(REQUESTS):
            if wedged and index in plan.stuck:
                continue
            rid = plan.request_id(role.pair, index)
            blocks = pool.alloc(1, owner=rid)
            if role.prefill:
                pool.key(0)[blocks[0]].fill_(_value(role.pair, index))
                handle = engine.send(rid, blocks, role.peer)
            else:
                handle = engine.receive(rid, blocks, role.peer)
            await handle.wait()
            done += 1
            good += role.prefill or bool((pool.key(0)[blocks[0]]
                                          == _value(role.pair, index)).all())
            pool.free(blocks, owner=rid)
        out.update(others=done, others_good=good, others_s=time.monotonic() - started,
                   stuck_open=all(not handle.done for handle, _ in stuck.values()))
        restarts.append(engine.restart_requested)

        raised, states = [], []
        for rid, (handle, blocks) in stuck.items():
            where["at"] = f"wait() on {rid}"
            started = time.monotonic()
            try:
                await handle.wait()
                raised.append(("completed", time.monotonic() - started, False))
            except TransferError as exc:
                raised.append((type(exc).__name__, time.monotonic() - started,
                               isinstance(exc, TransferTimeout)))
            states.append(engine.session(rid).state.name)
            pool.free(blocks, owner=rid)
        out.update(raised=raised, states=states, deferred=pool.num_deferred)
        if wedged and role.prefill:
            out["unhealthy"] = await _until(lambda: not engine.health().healthy)
            health = engine.health()
            out["health"] = (f"healthy={health.healthy} ({health.reason}, "
                             f"{health.quarantined} quarantined)")
        restarts.append(engine.restart_requested)
        where["at"] = "barrier: every host has freed"
        await barrier.arrive()

        if wedged and role.prefill:
            where["at"] = "the link recovers"
            link.recover()
            out["recovered"] = await _until(lambda: engine.health().healthy)
        out["released"] = await _until(lambda: pool.num_deferred == 0)
        where["at"] = "barrier: the link has recovered"
        await barrier.arrive()
        if wedged and not role.prefill:
            try:
                pool.assert_poisoned([blocks[0] for _, blocks in stuck.values()])
                out["still_poisoned"] = True
            except PoisonError:
                out["still_poisoned"] = False
        restarts.append(engine.restart_requested)
        where["at"] = "draining"
    out["restart"] = any(restarts)
    where["at"] = "done"
    return out


def judge_safe(plan: Plan, outcomes: dict[int, Outcome]) -> Verdict:
    failed = {r: o for r, o in outcomes.items() if o["kind"] != "ok"}
    if failed or len(outcomes) != WORLD:
        return Verdict(False, [f"rank {r}: {o['text']}" for r, o in sorted(failed.items())]
                       or [f"outcomes from ranks {sorted(outcomes)} only"])
    sender, receiver = plan.pair, plan.pair + PAIRS
    s, r = outcomes[sender], outcomes[receiver]
    names = " and ".join(plan.stuck_ids)
    checks: dict[str, bool] = {}
    wanted = {rank: REQUESTS - 2 * (rank in (sender, receiver)) for rank in range(WORLD)}
    checks["others"] = all(o["others"] == o["others_good"] == wanted[rank]
                           for rank, o in outcomes.items())
    checks["wedged"] = bool(s.get("held")) and s["stuck_open"] and r["stuck_open"]
    # Both ends fail each stuck request; whichever deadline fires first times out and the
    # other end hears of it from its peer (TransferFailed): either order is right.
    checks["timeout"] = all(
        mine[0] != "completed" and theirs[0] != "completed" and (mine[2] or theirs[2])
        for mine, theirs in zip(s["raised"], r["raised"], strict=True))
    checks["quarantined"] = s["states"] == ["QUARANTINED"] * 2
    checks["deferred"] = s["deferred"] == 2
    checks["unhealthy"] = bool(s["unhealthy"])
    checks["released"] = all(o["released"] for o in outcomes.values())
    checks["recovered"] = bool(s["recovered"])
    checks["no_late_write"] = bool(r["still_poisoned"])
    checks["no_restart"] = not any(o["restart"] for o in outcomes.values())
    others = sum(outcomes[rank]["others"] for rank in range(PAIRS))
    lines = [f"{others} other transfers completed on both links while the link from rank "
             f"{sender} to {receiver} wedged {names} "
             f"({max(s['others_s'], r['others_s']):.2f} s)"]
    for rid, mine, theirs, state in zip(plan.stuck_ids, s["raised"], r["raised"], s["states"],
                                        strict=True):
        lines.append(f"{rid}: wait() raised {mine[0]} after {mine[1]:.2f} s (rank {sender}, "
                     f"send) / {theirs[0]} after {theirs[1]:.2f} s (rank {receiver}, receive), "
                     f"no freeze; sender session {state}")
    lines += [
        f"host freed their blocks: {s['deferred']} deferred on rank {sender} (the transport may "
        f"still read them); rank {sender} health: {s.get('health')}",
        f"link recovered: deferred frees released ({checks['released']}), rank {sender} "
        f"healthy again ({bool(s['recovered'])}), rank {receiver}'s freed blocks still "
        f"poisoned (no late write: {bool(r['still_poisoned'])})",
        f"restart requested: {not checks['no_restart']} on every rank (per-request timeouts "
        "never ask)",
    ]
    failed_checks = [name for name, good in checks.items() if not good]
    if failed_checks:
        lines.append(f"NOT AS EXPECTED: {failed_checks}")
    return Verdict(not failed_checks, lines)


# --------------------------------------------------------------------------- running


def _as_outcome(rank: int, result: Any) -> Outcome:
    if isinstance(result, BaseException) or not isinstance(result, dict):
        outcome = exc_outcome(result)
        outcome["rank"] = rank
        return outcome
    return result


def run_mode(mode: str, seed: int, backend: str, show_stacks: bool) -> Verdict | None:
    """Run ``mode`` ("unsafe" or "fixed"); the verdict (None on MPI ranks other than 0)."""
    plan = Plan.of(seed)
    if mode != "unsafe":
        from kvhandoff import cuda_ext

        # The engine's block copy is built (or loaded from its cache) before any clock
        # starts: a first build takes longer than the run's bounds.
        cuda_ext.backend("cpu")
    if backend == "mpi":
        return _run_mpi(mode, seed, plan, show_stacks)
    from kvhandoff.engine.transports import loopback_group

    transports = loopback_group(WORLD)
    where = [{"at": "starting"} for _ in range(WORLD)]
    if mode == "unsafe":
        barrier = _ThreadBarrier(WORLD)
        fns = [functools.partial(unsafe_rank, rank, transports[rank], barrier, seed,
                                 where[rank]) for rank in range(WORLD)]
        results, hung = run_threads(fns, RANK_BOUND_S, lambda rank: where[rank]["at"])
        if hung:
            return Verdict(False, hung_lines(hung, RANK_BOUND_S, show_stacks))
        outcomes = {rank: _as_outcome(rank, result) for rank, result in results.items()}
        return judge_unsafe(plan, outcomes)
    import anyio

    async def main() -> dict[int, Outcome]:
        loop_barrier = _LoopBarrier(WORLD)
        found: dict[int, Outcome] = {}

        async def one(rank: int) -> None:
            try:
                found[rank] = await safe_rank(rank, transports[rank], loop_barrier, seed,
                                              where[rank])
            except Exception as exc:  # reported in the verdict
                found[rank] = _as_outcome(rank, exc)

        with anyio.move_on_after(RANK_BOUND_S):
            async with anyio.create_task_group() as group:
                for rank in range(WORLD):
                    group.start_soon(one, rank)
        return found

    outcomes = anyio.run(main)
    if len(outcomes) < WORLD:
        return Verdict(False, [f"rank {rank}: still at {where[rank]['at']} after "
                               f"{RANK_BOUND_S:g} s" for rank in range(WORLD)
                               if rank not in outcomes])
    return judge_safe(plan, outcomes)


def _run_mpi(mode: str, seed: int, plan: Plan, show_stacks: bool) -> Verdict | None:
    from kvhandoff.engine.transports import MPITransport
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    barrier = _MPIBarrier(world.Dup())
    transport = MPITransport(world)
    where = {"at": "starting"}
    header = (f"hung: a rank still running after the {RANK_BOUND_S:g} s bound (watchdog)"
              if rank == 0 else None)
    timer = mpi_watchdog(RANK_BOUND_S, lambda: where["at"], rank, 1, header, show_stacks)
    result: Any
    try:
        if mode == "unsafe":
            result = unsafe_rank(rank, transport, barrier, seed, where)
        else:
            import anyio

            result = anyio.run(safe_rank, rank, transport, barrier, seed, where)
    except Exception as exc:  # reported in the verdict
        result = exc
    gathered = world.gather(_as_outcome(rank, result), root=0)
    timer.cancel()
    transport.close()
    if gathered is None:
        return None
    outcomes = dict(enumerate(gathered))
    if mode == "unsafe":
        return judge_unsafe(plan, outcomes)
    return judge_safe(plan, outcomes)
