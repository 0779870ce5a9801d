"""MPITransport against raw mpi4py, measured side by side in one run.

    mpiexec -n 2 python benchmarks/bench_transport_mpi.py [--size-mib 64] [--reps 10]

Rank 0 sends to rank 1. Each repetition starts at a barrier and ends when both ranks'
operations are complete; its time is the slower rank's. Raw and transport repetitions are
interleaved so drift on a shared machine hits both alike; medians are reported.

Cases:
- one message of ``--size-mib``: raw ``Isend``/``Irecv`` + ``Waitall`` vs ``MPITransport``
  ``post_send``/``post_recv`` + a ``poll()`` loop (goal: ratio >= 0.95).
- many 4 KiB blocks, per-operation overhead: ``--blocks`` transport operations of 4 KiB
  vs the same raw ``Isend``/``Irecv`` polled with ``Testsome`` (what the transport does).
- many 4 KiB blocks vs one raw message of the same total bytes: what the engine avoids by
  gathering blocks into one buffer (its goal, with gathering, is a ratio >= 0.8).

The ratio is raw time / transport time: 1.0 means no overhead, below 1 means slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from kvhandoff.engine.transports import MPITransport
from mpi4py import MPI

BLOCK = 4096


def timed(comm: MPI.Comm, run: Callable[[], None]) -> float:
    comm.Barrier()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    return comm.allreduce(elapsed, op=MPI.MAX)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=1024)
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        print("run with exactly 2 ranks: mpiexec -n 2 python " + sys.argv[0], file=sys.stderr)
        return 2
    rank = comm.Get_rank()
    transport = MPITransport(comm)
    raw_comm = comm.Dup()
    nbytes = args.size_mib << 20
    big = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    big_np = big.numpy()
    small_total = args.blocks * BLOCK
    blocks = [torch.randint(0, 256, (BLOCK,), dtype=torch.uint8) for _ in range(args.blocks)]
    small_np = np.zeros(small_total, dtype=np.uint8)

    def raw_polled(bufs: list[np.ndarray]) -> Callable[[], None]:
        def run() -> None:
            if rank == 0:
                reqs = [raw_comm.Isend([b, MPI.BYTE], dest=1, tag=1 + i % 1000)
                        for i, b in enumerate(bufs)]
            else:
                reqs = [raw_comm.Irecv([b, MPI.BYTE], source=0, tag=1 + i % 1000)
                        for i, b in enumerate(bufs)]
            left = len(reqs)
            while left:
                left -= len(MPI.Request.Testsome(reqs) or ())
        return run

    def raw(buf: np.ndarray) -> Callable[[], None]:
        def run() -> None:
            if rank == 0:
                raw_comm.Isend([buf, MPI.BYTE], dest=1, tag=1).Wait()
            else:
                raw_comm.Irecv([buf, MPI.BYTE], source=0, tag=1).Wait()
        return run

    def ours(bufs: list[torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            if rank == 0:
                handles = [transport.post_send(b, 1, 1 + i % 1000) for i, b in enumerate(bufs)]
            else:
                handles = [transport.post_recv(b, 0, 1 + i % 1000) for i, b in enumerate(bufs)]
            left = len(handles)
            while left:
                left -= len(transport.poll())
            assert all(h.error is None for h in handles), [h.error for h in handles]
        return run

    block_arrays = [b.numpy() for b in blocks]
    cases = [
        (f"1 x {args.size_mib} MiB, raw Isend/Irecv+Wait", nbytes, raw(big_np), ours([big])),
        (f"{args.blocks} x 4 KiB, raw Isend/Irecv+Testsome", small_total,
         raw_polled(block_arrays), ours(blocks)),
        (f"{args.blocks} x 4 KiB vs raw 1 x {small_total >> 10} KiB", small_total,
         raw(small_np), ours(blocks)),
    ]
    results = []
    for name, total, raw_run, our_run in cases:
        raw_run()  # warm-up: connection setup and page faults are not what we measure
        our_run()
        raw_times, our_times = [], []
        for _ in range(args.reps):
            raw_times.append(timed(comm, raw_run))
            our_times.append(timed(comm, our_run))
        raw_s, our_s = statistics.median(raw_times), statistics.median(our_times)
        results.append((name, total / raw_s / 1e9, total / our_s / 1e9, raw_s / our_s))

    if rank == 0:
        print(f"MPITransport vs raw mpi4py, 2 ranks, {args.reps} interleaved reps, medians")
        print("| case: transport vs baseline | baseline GB/s | transport GB/s | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for name, raw_bw, our_bw, ratio in results:
            print(f"| {name} | {raw_bw:.2f} | {our_bw:.2f} | {ratio:.3f} |")
    comm.Barrier()
    transport.close()
    raw_comm.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
