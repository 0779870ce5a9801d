"""MPITransport and TransferEngine against raw mpi4py, measured side by side in one run.

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

Engine cases (``TransferEngine`` over ``MPITransport``, each rank's engine running its real
anyio loop; one ``receive`` on rank 1, one ``send`` on rank 0, timed until both handles'
``wait()`` returned, i.e. blocks gathered, moved, scattered and agreed):
- ``--size-mib`` in blocks of 512 KiB (8 layers, K and V) vs raw ``Isend``/``Irecv`` of the
  same bytes (goal: ratio >= 0.95). The engine also gathers the blocks into its staging buffer
  on the sender and scatters them on the receiver (two memory copies the raw message does not
  make), so a second row compares it with raw + the same ``cuda_ext`` gather and scatter.
- ``--size-mib`` in blocks of 4 KiB (one block across every layer, K and V, is 4 KiB: 16384
  blocks for 64 MiB) vs one raw message of the same bytes (goal: ratio >= 0.8).

Data plane (``--data-plane``, on by default; block ids scattered over a pool twice the size,
in random order, the same table on both ranks), for 512 KiB and 4 KiB blocks, side by side:
- raw 1 contiguous message of the same bytes: the one-copy rate, the limit here;
- raw mpi4py of the same block table: one ``hindexed`` datatype over absolute addresses,
  built, committed and freed per transfer, as the engine must;
- raw 1 contiguous message from torch memory: the same, but from a torch tensor (4 KiB
  pages, like the pool's blocks) instead of numpy's buffer (transparent huge pages on
  Linux); the kernel's one copy pins every page, so this is the one-copy rate of pool memory;
- raw cross-memory read of the same block table: rank 1 copies rank 0's blocks straight
  into its own with ``process_vm_readv`` (the kernel's one copy, cut into ``IOV_MAX``
  iovecs per call), the limit of any same-host region path;
- the engine's region path (``region_min_bytes=0``: the blocks move where they are, by
  cross-memory read on one host, see ``MPITransport``), the same over MPI datatypes
  (``use_cma=False``), its staged pipelined path (gather a piece while the one before is in
  flight, scatter each piece as it lands); the path the engine chooses by default
  (``MPITransport.region_min_bytes``) carries the goal, against the faster raw baseline (512 KiB
  blocks) and the raw same-table transfer (4 KiB blocks, the faster of hindexed and CMA),
  0.9 each.

The ratio is raw time / ours: 1.0 means no overhead, below 1 means slower.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import attrs
import numpy as np
import torch
from kvhandoff import cuda_ext
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine.transports import MPITransport
from mpi4py import MPI

BLOCK = 4096
# Pool layouts: (num_layers, block_tokens, kv_heads, head_dim) in float16.
# (name, baseline GB/s, ours GB/s, ratio), goal
_EngineRow = tuple[tuple[str, float, float, float], "float | None"]
LARGE_BLOCKS = (8, 16, 8, 128)  # 2 * 8 layers * 16 * 8 * 128 * 2 B = 512 KiB per block
SMALL_BLOCKS = (2, 4, 2, 64)  # 2 * 2 layers * 4 * 2 * 64 * 2 B = 4 KiB per block
# The data plane's 4 KiB blocks: 8 layers, K and V, 256 B per layer tensor (2 * 1 * 64 * 2 B).
PLANE_SMALL_BLOCKS = (8, 2, 1, 64)


def timed(comm: MPI.Comm, run: Callable[[], None]) -> float:
    comm.Barrier()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    return comm.allreduce(elapsed, op=MPI.MAX)


Rep = Callable[[], Awaitable[float]]  # one timed repetition: the slower rank's seconds


def timed_rep(comm: MPI.Comm, run: Callable[[], None]) -> Rep:
    async def rep() -> float:
        return timed(comm, run)
    return rep


async def side_by_side(reps: int, name: str, total: int, raw_rep: Rep,
                       our_rep: Rep) -> tuple[str, float, float, float]:
    """A warm-up of each (connection set-up and page faults are not what we measure), then
    ``reps`` repetitions alternating raw and ours: ``(name, raw GB/s, our GB/s, ratio)`` of
    the medians."""
    await raw_rep()
    await our_rep()
    raw_times, our_times = [], []
    for _ in range(reps):
        raw_times.append(await raw_rep())
        our_times.append(await our_rep())
    raw_s, our_s = statistics.median(raw_times), statistics.median(our_times)
    return name, total / raw_s / 1e9, total / our_s / 1e9, raw_s / our_s


def raw_message(raw_comm: MPI.Comm, buf: np.ndarray, tag: int) -> Callable[[], None]:
    """One raw message of ``buf`` from rank 0 to rank 1."""
    def run() -> None:
        if raw_comm.Get_rank() == 0:
            raw_comm.Isend([buf, MPI.BYTE], dest=1, tag=tag).Wait()
        else:
            raw_comm.Irecv([buf, MPI.BYTE], source=0, tag=tag).Wait()
    return run


def engine_rep(comm: MPI.Comm, engine: TransferEngine, block_ids: list[int], nbytes: int,
               prefix: str) -> Rep:
    """One engine transfer of ``block_ids`` from rank 0 to rank 1, timed from a barrier to
    both handles' ``wait()``."""
    serial = iter(range(1 << 30))

    async def rep() -> float:
        rid = f"{prefix}-{next(serial)}"
        comm.Barrier()
        start = time.perf_counter()
        if comm.Get_rank() == 0:
            handle = engine.send(rid, block_ids, 1)
        else:
            handle = engine.receive(rid, block_ids, 0)
        result = await handle.wait()
        elapsed = time.perf_counter() - start
        assert result.nbytes == nbytes, result
        return float(comm.allreduce(elapsed, op=MPI.MAX))
    return rep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=1024)
    parser.add_argument("--progress-spin-s", type=float, default=0.002,
                        help="MPITransport(progress_spin_s=...) of the data-plane engines")
    parser.add_argument("--no-legacy", action="store_true",
                        help="only the data-plane cases (skip the transport and engine rows)")
    parser.add_argument("--idle-sleep-s", type=float, default=EngineConfig().idle_sleep_s,
                        help="the engines' EngineConfig.idle_sleep_s (default: the default)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # two ranks share the cores; a parallel block copy would fight MPI
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
        (f"1 x {args.size_mib} MiB, raw Isend/Irecv+Wait", nbytes, raw_message(raw_comm, big_np, 1),
         ours([big])),
        (f"{args.blocks} x 4 KiB, raw Isend/Irecv+Testsome", small_total,
         raw_polled(block_arrays), ours(blocks)),
        (f"{args.blocks} x 4 KiB vs raw 1 x {small_total >> 10} KiB", small_total,
         raw_message(raw_comm, small_np, 1), ours(blocks)),
    ]
    config = EngineConfig(idle_sleep_s=args.idle_sleep_s)
    results, engine_results = [], []
    if not args.no_legacy:
        results = [anyio.run(side_by_side, args.reps, name, total, timed_rep(comm, raw_run),
                             timed_rep(comm, our_run))
                   for name, total, raw_run, our_run in cases]
        engine_results = anyio.run(engine_cases, comm, raw_comm, args.size_mib, args.reps,
                                   config)
    plane = anyio.run(data_plane, comm, raw_comm, args.size_mib << 20, args.reps, config,
                      args.progress_spin_s)

    if rank == 0 and not args.no_legacy:
        print(f"MPITransport vs raw mpi4py, 2 ranks, {args.reps} interleaved reps, medians")
        print("| case: transport vs baseline | baseline GB/s | transport GB/s | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for name, raw_bw, our_bw, ratio in results:
            print(f"| {name} | {raw_bw:.2f} | {our_bw:.2f} | {ratio:.3f} |")
        print()
        print(f"TransferEngine (real loop, idle_sleep_s={args.idle_sleep_s:g}) vs raw mpi4py, "
              f"2 ranks, {args.reps} interleaved reps, medians "
              f"(cuda_ext backend: {cuda_ext.backend()})")
        print("| case: engine vs baseline | baseline GB/s | engine GB/s | ratio | goal |")
        print("| --- | ---: | ---: | ---: | --- |")
        for (name, raw_bw, our_bw, ratio), goal in engine_results:
            verdict = "" if goal is None else (
                f">= {goal}: {'met' if ratio >= goal else 'missed'}")
            print(f"| {name} | {raw_bw:.2f} | {our_bw:.2f} | {ratio:.3f} | {verdict} |")
        print()
    if rank == 0:
        print_data_plane(plane, args.size_mib, args.reps)
    comm.Barrier()
    transport.close()
    raw_comm.Free()
    return 0


async def engine_cases(comm: MPI.Comm, raw_comm: MPI.Comm, size_mib: int, reps: int,
                       config: EngineConfig) -> list[_EngineRow]:
    """Each rank runs one engine per pool layout; rank 0 sends, rank 1 receives."""
    results = []
    raw_name = f"raw 1 x {size_mib} MiB"
    for layout, goal in ((LARGE_BLOCKS, 0.95), (SMALL_BLOCKS, 0.8)):
        results += await engine_layout(comm, raw_comm, size_mib << 20, reps, config, layout,
                                       [(f"vs {raw_name}", False, goal)]
                                       + ([(f"vs {raw_name} + gather + scatter", True, None)]
                                          if layout is LARGE_BLOCKS else []))
    return results


async def engine_layout(
    comm: MPI.Comm, raw_comm: MPI.Comm, nbytes: int, reps: int, config: EngineConfig,
    layout: tuple[int, int, int, int], baselines: list[tuple[str, bool, float | None]],
) -> list[_EngineRow]:
    """One engine per rank over a pool of ``layout`` holding ``nbytes`` of blocks; each
    baseline is ``(name, with_copies, goal)``."""
    rank = comm.Get_rank()
    num_layers, tokens, heads, head_dim = layout
    per_block = 2 * num_layers * tokens * heads * head_dim * 2  # float16
    num_blocks = nbytes // per_block
    pool = BlockPool(num_blocks, num_layers, tokens, heads, head_dim, dtype=torch.float16)
    assert pool.block_nbytes == per_block
    block_ids = pool.alloc(num_blocks, owner="bench")
    for layer in pool.layers:
        layer.view(torch.uint8).random_(0, 256)
    raw = raw_message(raw_comm, np.zeros(nbytes, dtype=np.uint8), 1)
    staging = torch.empty(nbytes, dtype=torch.uint8)
    case = f"{num_blocks} x {per_block >> 10} KiB blocks"

    def raw_with_copies() -> None:
        if rank == 0:
            cuda_ext.gather(pool.layers, block_ids, staging)
            raw_comm.Isend([staging.numpy(), MPI.BYTE], dest=1, tag=1).Wait()
        else:
            raw_comm.Irecv([staging.numpy(), MPI.BYTE], source=0, tag=1).Wait()
            cuda_ext.scatter(staging, pool.layers, block_ids)

    results: list[_EngineRow] = []
    transport = MPITransport(comm)
    async with TransferEngine(pool, transport, config=config) as engine:
        ours = engine_rep(comm, engine, block_ids, nbytes, "bench")
        for name, with_copies, goal in baselines:
            raw_run = raw_with_copies if with_copies else raw
            results.append((await side_by_side(reps, f"{case} {name}", nbytes,
                                               timed_rep(comm, raw_run), ours), goal))
        report = await engine.drain(10.0)
        assert report.clean, report
    transport.close()
    return results


# One data-plane layout's medians, GB/s: raw contiguous (numpy, torch memory), raw same
# table (hindexed, CMA), engine by path.
_PlaneRow = tuple[str, float, float, float, float, dict[str, float]]
# name: (EngineConfig.region_min_bytes, MPITransport(use_cma=...)). What the engine chooses
# by default (MPITransport.region_min_bytes) is marked, not run again: every engine's loop
# ticks while one transfers, so each extra engine costs the others.
PATHS: dict[str, tuple[int, bool]] = {
    "region path (CMA)": (0, True),
    "region path (MPI datatype)": (0, False),
    "staged pipelined": (1 << 62, True),
}


async def data_plane(comm: MPI.Comm, raw_comm: MPI.Comm, nbytes: int, reps: int,
                     config: EngineConfig, spin_s: float) -> list[_PlaneRow]:
    rows = []
    for layout in (LARGE_BLOCKS, PLANE_SMALL_BLOCKS):
        rows.append(await data_plane_layout(comm, raw_comm, nbytes, reps, config, layout,
                                            spin_s))
    return rows


async def data_plane_layout(comm: MPI.Comm, raw_comm: MPI.Comm, nbytes: int, reps: int,
                            config: EngineConfig, layout: tuple[int, int, int, int],
                            spin_s: float) -> _PlaneRow:
    """Every case of one layout, interleaved per repetition (one engine per path)."""
    import os

    from kvhandoff.engine.transports import _cma
    from kvhandoff.engine.transports._mpi import _mpi_blocks
    from kvhandoff.engine.transports._regions import block_regions

    rank = comm.Get_rank()
    num_layers, tokens, heads, head_dim = layout
    per_block = 2 * num_layers * tokens * heads * head_dim * 2  # float16
    num_blocks = nbytes // per_block
    pool = BlockPool(2 * num_blocks, num_layers, tokens, heads, head_dim, dtype=torch.float16)
    everything = pool.alloc(pool.num_blocks, owner="bench")
    rng = np.random.default_rng(7)  # the same table on both ranks
    block_ids = [int(b) for b in rng.choice(everything, num_blocks, replace=False)]
    for layer in pool.layers:
        layer.view(torch.uint8).random_(0, 256)
    contiguous = raw_message(raw_comm, np.zeros(nbytes, dtype=np.uint8), 1)
    contiguous_torch = raw_message(raw_comm, torch.zeros(nbytes, dtype=torch.uint8).numpy(), 3)

    def same_table() -> None:
        lengths, addresses = _mpi_blocks(block_regions(pool.layers, block_ids))
        datatype = MPI.BYTE.Create_hindexed(lengths, addresses).Commit()
        if rank == 0:
            raw_comm.Isend([MPI.BOTTOM, 1, datatype], dest=1, tag=2).Wait()
        else:
            raw_comm.Irecv([MPI.BOTTOM, 1, datatype], source=0, tag=2).Wait()
        datatype.Free()

    # Rank 1 reads rank 0's table: the pid and the regions' addresses cross once.
    table = block_regions(pool.layers, block_ids)
    peer_addresses = np.empty_like(table.addresses)
    comm.Sendrecv(table.addresses, 1 - rank, recvbuf=peer_addresses, source=1 - rank)
    pids = np.array([os.getpid(), 0], dtype=np.int64)
    comm.Sendrecv(pids[:1], 1 - rank, recvbuf=pids[1:], source=1 - rank)
    peer_pid = int(pids[1])

    def cma_same_table() -> None:
        if rank == 1:
            mine = block_regions(pool.layers, block_ids)  # built per transfer, as the engine
            local, remote = _cma.segments(mine.addresses, mine.lengths, peer_addresses,
                                          mine.lengths)
            _cma.read(peer_pid, local, remote)

    times: dict[str, list[float]] = {"contiguous": [], "torch memory": [], "same table": [],
                                     "cma": []}
    times.update({name: [] for name in PATHS})
    transports = {name: MPITransport(comm, progress_spin_s=spin_s, use_cma=cma)
                  for name, (_, cma) in PATHS.items()}
    async with contextlib.AsyncExitStack() as stack:
        engines = {}
        for name, (min_bytes, _) in PATHS.items():
            engines[name] = await stack.enter_async_context(TransferEngine(
                pool, transports[name],
                config=attrs.evolve(config, region_min_bytes=min_bytes)))
        ours = {name: engine_rep(comm, engine, block_ids, nbytes, f"plane{index}")
                for index, (name, engine) in enumerate(engines.items())}
        # Warm-up: connections, page faults.
        for raw_run in (contiguous, contiguous_torch, same_table, cma_same_table):
            raw_run()
        for rep in ours.values():
            await rep()
        for _ in range(reps):
            times["contiguous"].append(timed(comm, contiguous))
            times["torch memory"].append(timed(comm, contiguous_torch))
            times["same table"].append(timed(comm, same_table))
            times["cma"].append(timed(comm, cma_same_table))
            for name, rep in ours.items():
                times[name].append(await rep())
        for engine in engines.values():
            report = await engine.drain(10.0)
            assert report.clean, report
    for transport in transports.values():
        transport.close()
    rate = {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
    regions = len(block_regions(pool.layers, block_ids))
    case = (f"{num_blocks} x {per_block >> 10} KiB blocks "
            f"({per_block // (2 * num_layers)} B per layer tensor, {regions} regions)")
    hint = transports["region path (CMA)"].region_min_bytes
    chosen = ("region path (CMA)" if hint <= per_block // (2 * num_layers)
              else "staged pipelined")
    rate["default"] = rate[chosen]
    case += f", default: {chosen}"
    return (case, rate["contiguous"], rate["torch memory"], rate["same table"], rate["cma"],
            {n: rate[n] for n in PATHS} | {"default": rate["default"]})


def print_data_plane(rows: list[_PlaneRow], size_mib: int, reps: int) -> None:
    print(f"Data plane: {size_mib} MiB per transfer, block ids scattered, 2 ranks, {reps} "
          f"interleaved reps, medians, GB/s (cuda_ext backend: {cuda_ext.backend()})")
    print("| blocks | raw 1 contiguous msg | same, torch memory | raw same table (hindexed) "
          "| raw same table (CMA) | engine path | engine GB/s | vs contiguous | vs raw CMA "
          "| goal |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for index, (case, contiguous, torch_memory, same, cma, engine) in enumerate(rows):
        large = index == 0
        goal_base = max(contiguous, same, cma) if large else max(same, cma)
        for name, bw in engine.items():
            verdict = ""
            if name == "default":
                continue
            if case.endswith(f"default: {name}"):
                ratio = bw / goal_base
                verdict = (f">= 0.9 of {'the faster raw' if large else 'raw same table'}: "
                           f"{ratio:.2f}, {'met' if ratio >= 0.9 else 'missed'}")
            print(f"| {case} | {contiguous:.2f} | {torch_memory:.2f} | {same:.2f} | {cma:.2f} "
                  f"| {name} | {bw:.2f} | {bw / contiguous:.2f} | {bw / cma:.2f} | {verdict} |")


if __name__ == "__main__":
    sys.exit(main())
