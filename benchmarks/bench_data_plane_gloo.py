"""The engine's staged pipelined path over torch.distributed gloo against raw gloo of the
same bytes, side by side in one run.

    python benchmarks/bench_data_plane_gloo.py [--size-mib 64] [--reps 5]

Spawns 2 ranks (file rendezvous); rank 0 sends to rank 1. Cases, for 512 KiB and 4 KiB blocks
(block ids scattered over a pool twice the size, as in bench_transport_mpi's data plane):
raw ``isend``/``irecv`` of one contiguous tensor of the same bytes + ``wait()``, and the
engine over ``TorchDistTransport`` (gloo moves one buffer, so the engine takes its staged
pipelined path: 4 MiB pieces, gathered while the one before is in flight, scattered as they
land). Each repetition starts at a barrier and its time is the slower rank's; raw and
engine repetitions are interleaved; medians. Prints a markdown table on rank 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYOUTS = {"512 KiB": (8, 16, 8, 128), "4 KiB": (8, 2, 1, 64)}


def _slowest(elapsed: float) -> float:
    value = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def _rank(rank: int, store: str, size_mib: int, reps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    nbytes = size_mib << 20
    rows = [_layout(rank, name, layout, nbytes, reps) for name, layout in LAYOUTS.items()]
    if rank == 0:
        print(f"Staged pipelined engine over gloo vs raw gloo, {size_mib} MiB per transfer, "
              f"2 ranks, {reps} interleaved reps, medians")
        print("| blocks | raw gloo 1 contiguous GB/s | engine staged pipelined GB/s | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for case, raw_bw, our_bw in rows:
            print(f"| {case} | {raw_bw:.2f} | {our_bw:.2f} | {our_bw / raw_bw:.3f} |")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def _layout(rank: int, name: str, layout: tuple[int, int, int, int], nbytes: int,
            reps: int) -> tuple[str, float, float]:
    import anyio
    import numpy as np
    from kvhandoff.engine import BlockPool, TransferEngine
    from kvhandoff.engine.transports import TorchDistTransport

    layers, tokens, heads, dim = layout
    per_block = 2 * layers * tokens * heads * dim * 2
    count = nbytes // per_block
    pool = BlockPool(2 * count, layers, tokens, heads, dim, dtype=torch.float16)
    everything = pool.alloc(pool.num_blocks, owner="bench")
    ids = [int(b) for b in np.random.default_rng(7).choice(everything, count, replace=False)]
    raw = torch.empty(nbytes, dtype=torch.uint8)
    transport = TorchDistTransport()

    def raw_once() -> float:
        dist.barrier()
        start = time.perf_counter()
        work = dist.isend(raw, 1) if rank == 0 else dist.irecv(raw, 0)
        work.wait()
        return _slowest(time.perf_counter() - start)

    async def run() -> tuple[list[float], list[float]]:
        raw_times, ours = [], []
        async with TransferEngine(pool, transport) as engine:
            for rep in range(reps + 1):  # the first of each is a warm-up
                t_raw = raw_once()
                dist.barrier()
                start = time.perf_counter()
                handle = (engine.send(f"g-{rep}", ids, 1) if rank == 0
                          else engine.receive(f"g-{rep}", ids, 0))
                await handle.wait()
                t_ours = _slowest(time.perf_counter() - start)
                if rep:
                    raw_times.append(t_raw)
                    ours.append(t_ours)
            await engine.drain(10.0)
        return raw_times, ours

    raw_times, ours = anyio.run(run)
    transport.close()
    return (f"{count} x {name} blocks", nbytes / statistics.median(raw_times) / 1e9,
            nbytes / statistics.median(ours) / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "rendezvous")
        mp.start_processes(_rank, args=(store, args.size_mib, args.reps), nprocs=2,
                           start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
