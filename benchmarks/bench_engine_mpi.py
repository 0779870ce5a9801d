"""Many small transfers through two TransferEngines over MPI, against the raw work they wrap.

    mpiexec -n 2 python benchmarks/bench_engine_mpi.py [--batch 256] [--rounds 21]

Rank 0 sends, rank 1 receives; each rank's engine runs its real anyio loop over
``MPITransport``. One round is ``--batch`` requests of one 256-byte block each, timed from a
barrier until every handle on both ranks is done (the slower rank's time): admitted with
single ``send()`` / ``receive()`` calls, or with one ``send_many()`` / ``receive_many()``.
Baseline: the raw data work of the same requests over mpi4py, no engine: rank 0 gathers
each block (``cuda_ext.gather``) into its slice of a staging buffer and ``Isend``s it, rank 1
``Irecv``s each into its slice, both ``Waitall``, rank 1 scatters each
(``cuda_ext.scatter``). Rounds of the three alternate; sessions/s is throughput over every
round. The control payloads per request (frames the engines sent, both ranks) show what
framing does on a transport where each payload is an ``Isend`` and a probe: before wire
version 4 every control message was its own payload, three per request (ADVERTISE, ACCEPT,
DONE). To measure an older tree (single calls only), put its package first on the path:
``PYTHONPATH=<dir holding it as kvhandoff/> mpiexec -n 2 python benchmarks/bench_engine_mpi.py``.

Between rounds each engine's loop is blocked in a barrier with nothing in flight, so the
figures are the engines' own work plus MPI's, not the scheduling of idle loops; the engines
sleep ``idle_sleep_s`` when idle, which the default (0.5 ms) keeps small next to a round.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import numpy as np
import torch
from kvhandoff import cuda_ext
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine.transports import MPITransport
from mpi4py import MPI

try:  # run over an older tree (PYTHONPATH), from before batched calls: single calls only
    from kvhandoff.engine import TransferRequest
except ImportError:
    TransferRequest = None

POOL = dict(num_layers=2, block_tokens=4, kv_heads=1, head_dim=8, dtype=torch.float16)
CONFIG = EngineConfig(queue_timeout_s=600.0, transfer_timeout_s=600.0, lease_s=600.0)


def make_pool(blocks: int) -> BlockPool:
    return BlockPool(blocks, **POOL)  # type: ignore[arg-type]


class Engines:
    """This rank's engine and its blocks, reused every round."""

    def __init__(self, comm: MPI.Comm, batch: int) -> None:
        self.comm, self.batch = comm, batch
        self.rank = comm.Get_rank()
        self.pool = make_pool(batch)
        self.blocks = self.pool.alloc(batch, owner="bench")
        self.engine = TransferEngine(self.pool, MPITransport(comm), config=CONFIG)
        self.serial = 0

    def _rids(self) -> list[str]:
        base, self.serial = self.serial, self.serial + self.batch
        return [f"r{base + i}" for i in range(self.batch)]

    async def single(self) -> None:
        engine, blocks = self.engine, self.blocks
        if self.rank == 0:
            handles = [engine.send(rid, (blocks[i],), 1) for i, rid in enumerate(self._rids())]
        else:
            handles = [engine.receive(rid, (blocks[i],), 0)
                       for i, rid in enumerate(self._rids())]
        for handle in handles:
            await handle.wait()

    async def batched(self) -> None:
        engine, blocks = self.engine, self.blocks
        peer = 1 - self.rank
        requests = [TransferRequest(rid, (blocks[i],), peer) for i, rid in enumerate(self._rids())]
        handles = engine.send_many(requests) if self.rank == 0 else engine.receive_many(requests)
        for handle in handles:
            await handle.wait()


class Raw:
    """The same data work with mpi4py and ``cuda_ext`` only."""

    def __init__(self, comm: MPI.Comm, batch: int) -> None:
        self.comm, self.batch = comm, batch
        self.pool = make_pool(batch)
        self.nbytes = self.pool.block_nbytes
        self.staging = torch.empty(self.nbytes * batch, dtype=torch.uint8)
        self.buf = self.staging.numpy()

    async def round(self) -> None:
        comm, nbytes, layers = self.comm, self.nbytes, self.pool.layers
        requests = []
        if comm.Get_rank() == 0:
            for i in range(self.batch):
                cuda_ext.gather(layers, (i,), self.staging[i * nbytes:(i + 1) * nbytes])
                requests.append(comm.Isend([self.buf[i * nbytes:(i + 1) * nbytes], MPI.BYTE],
                                           dest=1, tag=100 + i))
            MPI.Request.Waitall(requests)
            return
        for i in range(self.batch):
            requests.append(comm.Irecv([self.buf[i * nbytes:(i + 1) * nbytes], MPI.BYTE],
                                       source=0, tag=100 + i))
        MPI.Request.Waitall(requests)
        for i in range(self.batch):
            cuda_ext.scatter(self.staging[i * nbytes:(i + 1) * nbytes], layers, (i,))


async def timed(comm: MPI.Comm, run: Callable[[], Awaitable[None]]) -> float:
    comm.Barrier()
    start = time.perf_counter()
    await run()
    return float(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))


async def bench(args: argparse.Namespace) -> None:
    comm = MPI.COMM_WORLD.Dup()  # the engines' transport
    raw_comm = MPI.COMM_WORLD.Dup()
    ours, raw = Engines(comm, args.batch), Raw(raw_comm, args.batch)
    async with ours.engine:
        runs = [("single", ours.single)]
        if TransferRequest is not None:
            runs.append(("batched", ours.batched))
        for _, run in [*runs, ("raw", raw.round)]:  # warm-up
            await timed(raw_comm, run)
        cases: dict[str, list[float]] = {"raw": [], **{name: [] for name, _ in runs}}
        frames = dict.fromkeys(cases, 0)
        engine = ours.engine

        def frames_sent() -> int:  # EngineStats.control_frames; trees before it have none
            return getattr(engine.stats(), "control_frames", 0)

        for _ in range(args.rounds):
            cases["raw"].append(await timed(raw_comm, raw.round))
            for name, run in runs:
                before = frames_sent()
                cases[name].append(await timed(raw_comm, run))
                frames[name] += frames_sent() - before
        totals = {name: raw_comm.allreduce(count) for name, count in frames.items()}
        raw_comm.Barrier()
    if comm.Get_rank() != 0:
        return
    done = args.batch * args.rounds
    rate = {name: done / sum(times) for name, times in cases.items()}
    print(f"TransferEngine over MPITransport, mpiexec -n 2, {args.batch} requests of one "
          f"{raw.nbytes}-byte block per round, {args.rounds} alternating rounds, throughput "
          f"(cuda_ext backend: {cuda_ext.backend()}; median round: "
          + ", ".join(f"{name} {statistics.median(t) * 1e3:.1f} ms" for name, t in cases.items())
          + ")")
    print("| case | raw | engine | ratio | control payloads per request |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, label in (("single", "single send()/receive() calls"),
                        ("batched", "one send_many() + one receive_many()")):
        if name not in rate:
            continue
        payloads = (f"{totals[name] / done:.2f}"
                    if hasattr(ours.engine.stats(), "control_frames") else "3 (one per message)")
        print(f"| sessions/s, {label} | {rate['raw']:,.0f}/s | {rate[name]:,.0f}/s | "
              f"{rate[name] / rate['raw']:.3f} | {payloads} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after set-up, as serving engines do")
    args = parser.parse_args()
    if MPI.COMM_WORLD.Get_size() != 2:
        print("run with: mpiexec -n 2 python benchmarks/bench_engine_mpi.py", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        try:  # one core per rank
            cores = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cores[MPI.COMM_WORLD.Get_rank() % len(cores)]})
        except OSError:
            pass
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    np.random.seed(0)
    anyio.run(bench, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
