"""Block gather/scatter vs its raw baselines, measured side by side in one run.

For each case the pool is one allocation ``[n_tensors, num_blocks, block_nbytes]`` viewed as
``n_tensors`` contiguous layer tensors, and every block is gathered in a random order (so the
bytes moved equal the pool's size). Printed ratios (higher is better for us):

- ``vs copy``: time of one plain ``copy_`` of the same number of bytes between two
  preallocated contiguous buffers / time of our gather. Goal >= 0.9 for 16 KiB blocks.
- ``vs loop``: time of a per-tensor ``index_select(out=...)`` loop (``index_copy_`` for
  scatter) into the same buffer / ours. Goal >= 1 everywhere, >= 2 (CPU) or >= 3 (GPU) for
  small blocks, where per-call overhead dominates.

Block to block (a second table per device): 64 MiB of blocks scattered over a pool four times
larger, moved into scattered blocks of a second pool of the same form, for the two block sizes
of the zero-copy goal (128 blocks x 512 KiB: 8 layers of K and V, 16 tokens x 8 heads x 128
fp16 each; 16384 blocks x 4 KiB: 16 tensors of 256 B). Contenders:

- ``loopback``: a ``LoopbackTransport`` region receive and region send of those blocks
  (``block_regions`` of both sides built inside the timed call, as a transfer would), which
  copies block to block in one pass (``cuda_ext.copy_regions``);
- ``copy_blocks``: ``cuda_ext.copy_blocks`` of the same blocks;
- ``memcpy``: one ``copy_`` of a contiguous 64 MiB tensor into another (the raw baseline);
- ``index ops``: per tensor ``index_copy_(0, dst_ids, src.index_select(0, src_ids))``.

Printed ratios: ``loopback vs memcpy`` (goal >= 0.9), ``copy_blocks vs memcpy`` and
``loopback vs index ops`` (higher is better for us).

Runs are interleaved round by round (ours, copy, loop, ...) and each contender's best round
is kept (timeit's convention: on a shared machine the least disturbed run is the closest to
the code's own cost, and interleaving exposes every contender to the same disturbances).
The CUDA part runs only when torch sees a GPU.

Usage: ``python benchmarks/bench_block_copy.py [--quick] [--rounds N] [--device cpu|cuda|all]
[--part packed|blocks|all]``.
Always exits 0; the goals are reported, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Callable

import kvhandoff.cuda_ext as cuda_ext
import torch
from kvhandoff.engine.transports import LoopbackTransport, block_regions

KiB = 1024
MiB = 1024 * KiB


MIN_SAMPLE_S = 0.02  # small cases repeat a call until one sample lasts at least this long


def clock(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``reps`` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / reps


def measure(
    contenders: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Best seconds per call of each contender over ``rounds`` interleaved rounds, after one
    warm-up round (which also sets how many calls make one sample)."""
    reps = {name: max(1, int(MIN_SAMPLE_S / clock(fn, 1, device)))
            for name, fn in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(clock(fn, reps[name], device))
    return {name: min(values) for name, values in times.items()}


def run_case(
    device: torch.device, n_tensors: int, num_blocks: int, block_nbytes: int, rounds: int
) -> dict[str, float]:
    pool = torch.randint(0, 256, (n_tensors, num_blocks, block_nbytes), dtype=torch.uint8,
                         device=device)
    layers = list(pool.unbind(0))  # each a contiguous [num_blocks, block_nbytes] tensor
    ids = torch.randperm(num_blocks)  # block tables live on the CPU
    ids_device = ids.to(device)
    nbytes = cuda_ext.packed_nbytes(layers, num_blocks)
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    # One scratch destination for both baselines keeps the 2 GiB case at 3 buffers, not 4.
    scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)
    flat = pool.view(-1)
    packed = out.view(n_tensors, num_blocks, block_nbytes)
    loop_dst = scratch.view(n_tensors, num_blocks, block_nbytes)

    def ours_gather() -> object:
        return cuda_ext.gather(layers, ids, out)

    def ours_scatter() -> object:
        cuda_ext.scatter(out, layers, ids)
        return None

    def plain_copy() -> object:
        return scratch.copy_(flat)

    def loop_gather() -> object:
        for i, layer in enumerate(layers):
            torch.index_select(layer, 0, ids_device, out=loop_dst[i])
        return None

    def loop_scatter() -> object:
        for i, layer in enumerate(layers):
            layer.index_copy_(0, ids_device, packed[i])
        return None

    best = measure(
        {"gather": ours_gather, "copy": plain_copy, "loop_gather": loop_gather,
         "scatter": ours_scatter, "loop_scatter": loop_scatter},
        rounds, device,
    )
    # The contenders must agree on the bytes, or the timings mean nothing.
    cuda_ext.gather(layers, ids, out)
    loop_gather()
    assert torch.equal(out.view_as(loop_dst), loop_dst), "gather disagrees with index_select"
    return {**best, "nbytes": float(nbytes)}


def report(device: torch.device, cases: list[tuple[str, int, int, int]], rounds: int) -> None:
    print(f"\n## {device.type}: backend {cuda_ext.backend(device)!r}, best of {rounds} rounds")
    print("| case | tensors x blocks x bytes | moved | ours gather GB/s | copy GB/s | "
          "gather vs copy | gather vs loop | scatter vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for label, n_tensors, num_blocks, block_nbytes in cases:
        r = run_case(device, n_tensors, num_blocks, block_nbytes, rounds)
        gbps = r["nbytes"] / r["gather"] / 1e9
        copy_gbps = r["nbytes"] / r["copy"] / 1e9
        print(
            f"| {label} | {n_tensors} x {num_blocks} x {block_nbytes} "
            f"| {r['nbytes'] / MiB:.1f} MiB | {gbps:.2f} | {copy_gbps:.2f} "
            f"| {r['copy'] / r['gather']:.2f} | {r['loop_gather'] / r['gather']:.2f} "
            f"| {r['loop_scatter'] / r['scatter']:.2f} |",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cases_for(quick: bool) -> list[tuple[str, int, int, int]]:
    """(label, tensors, blocks, bytes per block per tensor)."""
    sweep_total = 64 * MiB if quick else 256 * MiB
    cases = [("headline", 32, 512 if quick else 4096, 16 * KiB)]
    for block_nbytes in (256, 1 * KiB, 2 * KiB, 16 * KiB, 64 * KiB, 1 * MiB):
        cases.append(("sweep", 32, sweep_total // (32 * block_nbytes), block_nbytes))
    # Few, huge blocks: the CPU kernel splits them into chunks so every core copies.
    cases.append(("few", 2, 1, (8 if quick else 32) * MiB))
    # One short request: 32 layers x (K, V), a few blocks; per-call overhead dominates.
    cases.append(("request", 64, 16, 2 * KiB))
    cases.append(("request", 64, 4, 512))
    return cases


def run_blocks_case(device: torch.device, n_tensors: int, n_ids: int, tensor_block_nbytes: int,
                    rounds: int) -> dict[str, float]:
    """Block-to-block contenders on two pools of ``4 * n_ids`` blocks."""
    num_blocks = 4 * n_ids
    generator = torch.Generator().manual_seed(n_ids)
    pools = [torch.randint(0, 256, (n_tensors, num_blocks, tensor_block_nbytes),
                           dtype=torch.uint8, generator=generator).to(device) for _ in range(2)]
    src_layers, dst_layers = list(pools[0].unbind(0)), list(pools[1].unbind(0))
    src_ids = torch.randperm(num_blocks, generator=generator)[:n_ids]
    dst_ids = torch.randperm(num_blocks, generator=generator)[:n_ids]
    src_list, dst_list = src_ids.tolist(), dst_ids.tolist()
    src_index, dst_index = src_ids.to(device), dst_ids.to(device)
    nbytes = n_tensors * n_ids * tensor_block_nbytes
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(generator=None)
    flat_dst = torch.empty_like(flat_src)
    sender, receiver = LoopbackTransport.pair()
    tag = 0

    def loopback() -> object:
        nonlocal tag
        tag = tag % 1_000_000 + 1
        recv = receiver.post_recv_regions(block_regions(dst_layers, dst_list), 0, tag)
        sender.post_send_regions(block_regions(src_layers, src_list), 1, tag)
        receiver.poll()
        sender.poll()
        assert recv.error is None, recv.error
        return None

    def copy_blocks() -> object:
        cuda_ext.copy_blocks(src_layers, src_ids, dst_layers, dst_ids)
        return None

    def memcpy() -> object:
        return flat_dst.copy_(flat_src)

    def index_ops() -> object:
        for src, dst in zip(src_layers, dst_layers, strict=True):
            dst.index_copy_(0, dst_index, src.index_select(0, src_index))
        return None

    best = measure({"loopback": loopback, "copy_blocks": copy_blocks, "memcpy": memcpy,
                    "index": index_ops}, rounds, device)
    # The contenders must agree on the bytes, or the timings mean nothing.
    pools[1].zero_()
    loopback()
    moved = pools[1][:, dst_index].clone()
    pools[1].zero_()
    index_ops()
    assert torch.equal(moved, pools[1][:, dst_index]), "loopback disagrees with index ops"
    assert torch.equal(moved, pools[0][:, src_index]), "loopback moved the wrong blocks"
    sender.close()
    receiver.close()
    return {**best, "nbytes": float(nbytes)}


def report_blocks(device: torch.device, quick: bool, rounds: int) -> None:
    print(f"\n## {device.type} block to block: backend {cuda_ext.backend(device)!r}, "
          f"best of {rounds} rounds, ids scattered over pools 4x larger")
    print("| case | blocks x bytes (tensors x bytes) | moved | loopback GB/s | memcpy GB/s | "
          "loopback vs memcpy | copy_blocks vs memcpy | loopback vs index ops |")
    print("|---|---|---|---|---|---|---|---|")
    total = 16 * MiB if quick else 64 * MiB
    for label, n_tensors, tensor_block in (("512 KiB blocks", 16, 32 * KiB),
                                           ("4 KiB blocks", 16, 256)):
        n_ids = total // (n_tensors * tensor_block)
        r = run_blocks_case(device, n_tensors, n_ids, tensor_block, rounds)
        print(
            f"| {label} | {n_ids} x {n_tensors * tensor_block // KiB} KiB "
            f"({n_tensors} x {tensor_block}) | {r['nbytes'] / MiB:.1f} MiB "
            f"| {r['nbytes'] / r['loopback'] / 1e9:.2f} | {r['nbytes'] / r['memcpy'] / 1e9:.2f} "
            f"| {r['memcpy'] / r['loopback']:.2f} | {r['memcpy'] / r['copy_blocks']:.2f} "
            f"| {r['index'] / r['loopback']:.2f} |",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--part", choices=("packed", "blocks", "all"), default="all",
                        help="gather/scatter tables, block-to-block tables, or both")
    args = parser.parse_args(argv)
    print(f"# bench_block_copy {datetime.date.today()} | {platform.machine()} | "
          f"{torch.get_num_threads()} torch threads | Python {platform.python_version()} | "
          f"torch {torch.__version__}")
    for name in ("cpu", "cuda"):
        if args.device not in (name, "all"):
            continue
        if name == "cuda":
            if not torch.cuda.is_available():
                print("\n## cuda: skipped (torch sees no GPU)")
                continue
            print(f"GPU: {torch.cuda.get_device_name()}")
        device = torch.device(name)
        if args.part in ("packed", "all"):
            report(device, cases_for(args.quick), args.rounds)
        if args.part in ("blocks", "all"):
            report_blocks(device, args.quick, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
