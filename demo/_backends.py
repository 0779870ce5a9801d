"""How the demo's four ranks are run: all in this process, or one per process under MPI.

``run_embedded``: four ``TransferEngine`` instances in one anyio event loop, over the
loopback transport and in-process TP groups (``collectives.local_group``). ``run_mpi``: this
process's rank of ``mpiexec -n 4``, ``MPITransport`` over COMM_WORLD and the TP group split
from it; rank 0 gathers every rank's summary. ``run_mpi(..., nixl=True)`` (``--backend
nixl``): the same processes and TP groups, the data and the engines' control messages over
``NixlTransport`` (its agents' metadata exchanged over MPI with ``over_mpi``; the engine
registers each pool with it at start). All build the same pools (debug mode: freed
blocks are poisoned) and engine config, wrap each transport in a seeded ``FaultyTransport``
under ``--faults``, and drive the ranks' hosts with ``drive``. Every import of torch, anyio,
rich or mpi4py happens inside a function, so importing this module stays cheap.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvhandoff.demo._host import RankHost, RankSummary
from kvhandoff.demo._plan import TP, WORLD, Plan

if TYPE_CHECKING:
    from kvhandoff.engine import BlockPool, EngineConfig
    from kvhandoff.engine.transports import Transport

# Every rank's summary, and the seconds the request loops took less the hosts' own KV writing
# and verification (which block the loop): the timed transfers (the slowest process's).
Result = tuple[list[RankSummary], float]


def engine_config(plan: Plan) -> EngineConfig:
    """The engine's deadlines (short under ``--faults``, as stuck operations end there), with
    the end-to-end checksum on: the demo shows every transfer verified by the engine itself,
    and its timed figure includes that cost."""
    from kvhandoff.engine import EngineConfig

    if plan.faults:  # stuck operations end at the transfer deadline: keep it short
        return EngineConfig(queue_timeout_s=10.0, transfer_timeout_s=2.0, lease_s=10.0,
                            drain_timeout_s=20.0, checksum=True)
    return EngineConfig(queue_timeout_s=60.0, transfer_timeout_s=60.0, drain_timeout_s=20.0,
                        checksum=True)


def wrap_faulty(transport: Transport, plan: Plan, rank: int) -> Transport:
    """``transport`` itself, or under ``--faults`` a ``FaultyTransport`` seeded per rank."""
    if not plan.faults:
        return transport
    from kvhandoff.engine.transports import FaultyTransport

    return FaultyTransport(transport, seed=plan.seed * 1009 + rank, error_rate=0.03,
                           stuck_rate=0.03, delay_rate=0.25, delay_s=0.005)


def make_pool(plan: Plan) -> BlockPool:
    """One rank's KV pool (bf16, debug mode: freed blocks are poisoned)."""
    import torch
    from kvhandoff.engine import BlockPool

    return BlockPool(plan.num_blocks, plan.layers, plan.block_tokens, plan.kv_heads,
                     plan.head_dim, dtype=torch.bfloat16, debug=True)


async def drive(hosts: Sequence[RankHost]) -> Result:
    """Run the hosts' request loops, drain every engine, and read the books."""
    import anyio

    start = time.perf_counter()
    async with anyio.create_task_group() as group:
        for host in hosts:
            group.start_soon(host.run)
    # The hosts of one process share its loop, and their KV writing and verification block
    # it: the transfers' time is the rest.
    seconds = time.perf_counter() - start - sum(host.host_seconds for host in hosts)
    left: dict[int, int] = {}

    async def drain(host: RankHost) -> None:
        report = await host.engine.drain(host.engine.config.drain_timeout_s)
        left[host.rank] = len(report.left)

    async with anyio.create_task_group() as group:  # every TP rank drains at once
        for host in hosts:
            group.start_soon(drain, host)
    return [host.summary(left[host.rank]) for host in hosts], seconds


class Progress:
    """A rich progress bar over requests finished on every rank of this process."""

    def __init__(self, total: int, local_ranks: int, enabled: bool) -> None:
        self._need = local_ranks
        self._seen: collections.Counter[int] = collections.Counter()
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self._bar = Bar("[progress.description]{task.description}", BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            transient=True)
            self._task = self._bar.add_task("requests", total=total)

    def done(self, index: int) -> None:
        """Rank-local request ``index`` finished; the bar advances once all have."""
        self._seen[index] += 1
        if self._seen[index] == self._need and self._bar is not None:
            self._bar.advance(self._task)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def run_embedded(plan: Plan, progress: bool) -> Result:
    """All four ranks in this process, in one event loop."""
    import anyio
    from kvhandoff.collectives import local_group
    from kvhandoff.engine import TransferEngine
    from kvhandoff.engine.transports import loopback_group

    async def main() -> Result:
        transports = [wrap_faulty(t, plan, r) for r, t in enumerate(loopback_group(WORLD))]
        comms = [*local_group(TP, name="prefill-tp"),
                 *local_group(TP, name="decode-tp", first_log_rank=TP)]
        config = engine_config(plan)
        with Progress(len(plan.requests), WORLD, progress) as bar:
            async with contextlib.AsyncExitStack() as stack:
                hosts = []
                for r in range(WORLD):
                    pool = make_pool(plan)
                    engine = TransferEngine(pool, transports[r], tp_comm=comms[r],
                                            config=config, layout_extra=(r % TP, TP))
                    await stack.enter_async_context(engine)
                    hosts.append(RankHost(plan, r, pool, engine, bar.done))
                return await drive(hosts)

    return anyio.run(main)


def run_mpi(plan: Plan, progress: bool, nixl: bool = False) -> Result | None:
    """This process's rank; returns every rank's summary on rank 0, None elsewhere. With
    ``nixl`` the data moves over ``NixlTransport`` (one-sided WRITEs), MPI only bootstraps
    it and carries the TP groups' collectives."""
    import anyio
    from kvhandoff.collectives import CheckedComm
    from kvhandoff.engine import TransferEngine
    from kvhandoff.engine.transports import MPITransport, NixlTransport
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    tp_comm = CheckedComm.from_mpi(world.Split(color=rank // TP, key=rank),
                                   name="prefill-tp" if rank < TP else "decode-tp")
    inner: Transport = NixlTransport.over_mpi(world) if nixl else MPITransport(world)
    transport = wrap_faulty(inner, plan, rank)
    pool = make_pool(plan)
    engine = TransferEngine(pool, transport, tp_comm=tp_comm, config=engine_config(plan),
                            layout_extra=(rank % TP, TP))

    async def main() -> Result:
        with Progress(len(plan.requests), 1, progress and rank == 0) as bar:
            async with engine:
                return await drive([RankHost(plan, rank, pool, engine, bar.done)])

    world.Barrier()  # start the clock together
    try:
        summaries, seconds = anyio.run(main)
    except BaseException:
        # The other ranks would wait for this one's summary forever: end the whole job.
        traceback.print_exc()
        sys.stderr.flush()
        world.Abort(1)
        raise
    gathered = world.gather((summaries[0], seconds), root=0)
    transport.close()
    if isinstance(inner, NixlTransport):
        inner.release_memory()  # the engine drained: nothing is pending, so this frees all
        world.Barrier()  # no agent goes away while a peer may still send it a notification
    if gathered is None:  # not rank 0
        return None
    return [s for s, _ in gathered], max(t for _, t in gathered)
