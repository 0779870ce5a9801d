"""NixlTransport against raw NIXL moving the same descriptors, two processes, one run.

    python benchmarks/bench_transport_nixl.py [--reps 10] [--tls cma|tcp|...]

Starts two ranks on this host (they meet through a file rendezvous); rank 0 writes 64 MiB of
pool blocks into rank 1's pool per repetition. Each process holds two agents: the
transport's and a raw one; raw and transport repetitions alternate so drift on a shared
machine hits both alike; medians are reported.

One repetition, timed on rank 0 from its "go" to the target's "done" (the same two small
messages on both sides, so the round trip is in both):

- ours: the target posts ``post_recv_regions`` (its ADVERTISE carries the descriptors),
  rank 0 has posted ``post_send_regions`` before the "go", so the WRITE starts when the
  advertisement arrives (regions cut, descriptor lists prepared, WRITE posted, polled); the
  target sees DONE and answers "done".
- raw, per transfer: the target answers "go" with a "ready" notification (it shared the
  descriptors once, up front); rank 0 prepares both descriptor lists from the same
  (address, length) arrays, makes the WRITE with a notification, transfers, polls
  ``check_xfer_state``; the target polls ``get_new_notifs`` and answers "done".
- raw, prepared once: as above with both descriptor lists prepared once outside the timing
  (the idiom of a pool whose blocks are addressed by index): only ``make_prepped_xfer``,
  ``transfer`` and the polling are timed.

- engine: ``TransferEngine`` over its own ``NixlTransport`` (a third agent per process), the
  pool's layers registered at its start: rank 0's "go" (a raw notification) makes rank 1
  call ``receive`` (posted and advertised), rank 0 calls ``send`` and the repetition ends
  when its ``wait()`` returns, i.e. on the receiver's DONE (the outcome handshake): the same
  go / descriptors / WRITE / done as the raw cases, on the engine's region path (a 64 MiB
  transfer moves as 16 operations of 4 MiB, each with its own advertisement).

Layouts (float16): 128 blocks of 512 KiB (8 layers, K and V: 16 tensors of 32 KiB per
block) and 16384 blocks of 4 KiB (2 layers: 4 tensors of 1 KiB per block), the blocks chosen
at random on both sides, so runs rarely merge. Ratio = raw time / ours (goal >= 0.9). Also
printed: how long ``transfer()`` itself takes (over cma the copy happens inside the call).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import torch
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine.transports import NixlTransport, block_regions
from kvhandoff.engine.transports._regions import common_cut

# name, (num_layers, block_tokens, kv_heads, head_dim), blocks per transfer
LAYOUTS = [("128 x 512 KiB, 8 layers", (8, 16, 8, 128), 128),
           ("16384 x 4 KiB, 2 layers", (2, 4, 2, 64), 16384)]
GOAL = 0.9


def pool_tensors(layout: tuple[int, int, int, int], blocks: int, fill: int) -> list[torch.Tensor]:
    layers, tokens, heads, dim = layout
    return [torch.full((2 * blocks, tokens, heads, dim), fill, dtype=torch.float16)
            for _ in range(2 * layers)]


def choose(blocks: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(2 * blocks, size=blocks, replace=False)


class Raw:
    """The raw NIXL side: one agent, notifications as its only channel."""

    def __init__(self, rank: int, folder: str) -> None:
        from nixl_cu13 import nixl_agent, nixl_agent_config

        self.agent = nixl_agent(f"raw-{rank}-{os.getpid()}",
                                nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self.rank = rank
        self.folder = folder
        self.peer = ""
        self.box: list[bytes] = []

    def register(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self.agent.register_memory(t)

    def connect(self) -> None:
        """After registration: share the full metadata through the folder."""
        path = os.path.join(self.folder, f"raw{self.rank}")
        with open(path + ".tmp", "wb") as f:
            f.write(self.agent.get_agent_metadata())
        os.replace(path + ".tmp", path)
        other = os.path.join(self.folder, f"raw{1 - self.rank}")
        while not os.path.exists(other):
            time.sleep(1e-3)
        with open(other, "rb") as f:
            name = self.agent.add_remote_agent(f.read())
        self.peer = name.decode() if isinstance(name, bytes) else name

    def send(self, message: bytes) -> None:
        self.agent.send_notif(self.peer, message)

    def expect(self, prefix: bytes) -> bytes:
        while True:
            for messages in self.agent.get_new_notifs().values():
                self.box += messages
            if self.box:
                message = self.box.pop(0)
                assert message.startswith(prefix), (message[:20], prefix)
                return message[len(prefix):]


def descriptors(addresses: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.stack([addresses, lengths, np.zeros_like(addresses)], axis=1)


Row = tuple[str, str, str, int, int, float, float, float]


def run_rank(rank: int, folder: str, reps: int) -> None:
    torch.set_num_threads(1)
    transport = NixlTransport.rendezvous(folder, rank, 2, timeout_s=120)
    raw = Raw(rank, folder)
    layouts = []
    for name, layout, blocks in LAYOUTS:
        tensors = pool_tensors(layout, blocks, fill=rank + 1)
        transport.register(tensors)
        raw.register(tensors)
        ids = choose(blocks, seed=rank)
        layouts.append((name, layout, blocks, tensors, ids))
    raw.connect()
    results: list[Row] = []
    for index, (name, layout, blocks, tensors, ids) in enumerate(layouts):
        results += anyio.run(bench_layout, rank, transport, raw, 1 + index, name, layout,
                             blocks, tensors, ids, reps)
    if rank == 0:
        print(f"NixlTransport and the engine over it vs raw NIXL, 2 processes on 127.0.0.1, "
              f"{reps} interleaved reps, medians; "
              f"UCX_TLS={os.environ.get('UCX_TLS', '(default)')}")
        print("| layout | ours | baseline | descriptors | baseline GB/s | ours GB/s | ratio "
              "| goal | raw transfer() ms |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
        for name, who, label, nbytes, count, base, ours, in_call in results:
            ratio = base / ours
            verdict = f">= {GOAL}: {'met' if ratio >= GOAL else 'missed'}"
            print(f"| {name} | {who} | {label} | {count} | {nbytes / base / 1e9:.2f} | "
                  f"{nbytes / ours / 1e9:.2f} | {ratio:.3f} | {verdict} | {in_call * 1e3:.1f} |")
    sys.stdout.flush()
    os._exit(0)  # no NIXL teardown at exit: the other rank may still be connected


async def bench_layout(rank: int, transport: NixlTransport, raw: Raw, tag: int, name: str,
                       layout: tuple[int, int, int, int], blocks: int,
                       tensors: list[torch.Tensor], ids: np.ndarray, reps: int) -> list[Row]:
    peer = 1 - rank
    # The engine's own transport (it owns that transport's control channel and tags) and a
    # pool of the same geometry, the same block ids moved.
    meeting = os.path.join(raw.folder, f"engine{tag}")
    os.makedirs(meeting, exist_ok=True)
    engine_transport = NixlTransport.rendezvous(meeting, rank, 2, timeout_s=120)
    pool = BlockPool(2 * blocks, *layout, dtype=torch.float16)
    for layer in pool.layers:
        layer.fill_(rank + 1)
    held = pool.alloc(2 * blocks, owner="host")
    engine_ids = [int(i) for i in ids]
    config = EngineConfig(lease_s=60.0, transfer_timeout_s=60.0, queue_timeout_s=60.0,
                          agreement_timeout_s=60.0)
    async with TransferEngine(pool, engine_transport, config=config) as engine:
        rows = await _bench_cases(rank, peer, transport, raw, tag, name, tensors, ids, reps,
                                  engine, engine_ids)
        if rank == 1:
            for layer in pool.layers:  # every byte of the last transfer landed
                assert bool((layer[engine_ids] == 1).all())
        await engine.drain(30.0)
    pool.free(held, owner="host")
    return rows


async def _bench_cases(rank: int, peer: int, transport: NixlTransport, raw: Raw, tag: int,
                       name: str, tensors: list[torch.Tensor], ids: np.ndarray, reps: int,
                       engine: TransferEngine, engine_ids: list[int]) -> list[Row]:
    regions = block_regions(tensors, ids)
    box: list[bytes] = []

    def expect(prefix: bytes) -> None:
        while not box:
            transport.poll()
            box.extend(m for _, m in transport.recv_control())
        assert box.pop(0) == prefix

    # The raw baseline shares the target's descriptors once, before any timing, and cuts
    # them with ours (the same descriptors in both).
    local = remote = piece = np.zeros(0, dtype=np.uint64)
    if rank == 1:
        raw.send(b"descs" + regions.addresses.astype("<u8").tobytes()
                 + regions.lengths.astype("<u8").tobytes())
    else:
        pairs = np.frombuffer(raw.expect(b"descs"), dtype="<u8").reshape(2, -1)
        local, remote, piece = common_cut(regions.addresses, regions.lengths,
                                            pairs[0].copy(), pairs[1].copy())
    agent = raw.agent
    prepped: list[Any] = []
    transfer_times: list[float] = []

    def raw_rep(prepare_each: bool) -> float:
        if rank == 1:
            raw.expect(b"go")
            raw.send(b"ready")
            raw.expect(b"written")
            raw.send(b"done")
            return 0.0
        start = time.perf_counter()
        raw.send(b"go")
        raw.expect(b"ready")
        if prepare_each or not prepped:
            lists = (agent.prep_xfer_dlist("NIXL_INIT_AGENT", descriptors(local, piece), "DRAM"),
                     agent.prep_xfer_dlist(raw.peer, descriptors(remote, piece), "DRAM"))
            if not prepare_each:
                prepped.extend(lists)
                start = time.perf_counter()  # prepared once: outside the timing
        else:
            lists = (prepped[0], prepped[1])
        idx = np.arange(len(piece), dtype=np.int32)
        handle = agent.make_prepped_xfer("WRITE", lists[0], idx, lists[1], idx,
                                         notif_msg=b"written")
        t = time.perf_counter()
        state = agent.transfer(handle)
        transfer_times.append(time.perf_counter() - t)
        while state == "PROC":
            state = agent.check_xfer_state(handle)
        assert state == "DONE", state
        raw.expect(b"done")
        elapsed = time.perf_counter() - start
        handle.release()
        if prepare_each:
            lists[0].release()
            lists[1].release()
        return elapsed

    def ours_rep() -> float:
        if rank == 1:
            expect(b"go")
            handle = transport.post_recv_regions(regions, peer, tag)
            while not handle.final:
                transport.poll()
            assert handle.error is None, handle.error
            transport.send_control(peer, b"done")
            return 0.0
        handle = transport.post_send_regions(regions, peer, tag)
        start = time.perf_counter()
        transport.send_control(peer, b"go")
        while not handle.final:
            transport.poll()
        assert handle.error is None, handle.error
        expect(b"done")
        return time.perf_counter() - start

    async def engine_rep(rep: int) -> float:
        rid = f"bench-{tag}-{rep}"
        if rank == 1:
            raw.expect(b"go")
            await engine.receive(rid, engine_ids, peer).wait()
            return 0.0
        start = time.perf_counter()
        raw.send(b"go")
        await engine.send(rid, engine_ids, peer).wait()  # ends on the receiver's DONE
        return time.perf_counter() - start

    cases: list[tuple[str, Callable[[], float]]] = [
        ("raw, lists prepared per transfer", lambda: raw_rep(True)),
        ("raw, lists prepared once", lambda: raw_rep(False)),
    ]
    ours_times: list[float] = []
    engine_times: list[float] = []
    raw_times: dict[str, list[float]] = {label: [] for label, _ in cases}
    for rep in range(reps + 1):  # the first round warms up connections and lists
        for label, run in cases:
            t = run()
            if rep:
                raw_times[label].append(t)
        t = ours_rep()
        if rep:
            ours_times.append(t)
        t = await engine_rep(rep)
        if rep:
            engine_times.append(t)
    if rank == 1:
        # Every byte of the last WRITE landed where the target advertised it.
        for tensor in tensors:
            assert bool((tensor[ids] == 1).all())
        transport.send_control(peer, b"checked")
        return []
    expect(b"checked")
    in_call = statistics.median(transfer_times)
    return [(name, who, label, regions.nbytes, len(piece),
             statistics.median(raw_times[label]), statistics.median(times), in_call)
            for who, times in (("transport", ours_times), ("engine", engine_times))
            for label, _ in cases]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tls", default=None, help="UCX_TLS for both ranks (default: UCX's)")
    parser.add_argument("--rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank >= 0:
        run_rank(args.rank, args.folder, args.reps)
        return 0
    folder = tempfile.mkdtemp(prefix="kvhandoff-bench-nixl-")
    env = dict(os.environ)
    if args.tls:
        env["UCX_TLS"] = args.tls
    env.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--folder",
                                   folder, "--reps", str(args.reps)], env=env,
                                  stderr=subprocess.DEVNULL if r else None)
                 for r in range(2)]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=1200))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                print("benchmark timed out", file=sys.stderr)
                return 1
        return 0 if codes == [0, 0] else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
