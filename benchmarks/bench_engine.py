"""TransferEngine over the loopback transport against the raw work it wraps, side by side.

    python benchmarks/bench_engine.py [--batch 256] [--rounds 21]
    python benchmarks/bench_engine.py --profile [--batched] [--sort cumulative]
    python benchmarks/bench_engine.py --against REV [--repeats 7]

Two in-process engines (ranks 0 and 1 of one ``loopback_group``) are driven by direct
``_tick()`` calls inside one anyio event loop (no engine task: the numbers are the engine's
own cost, not the scheduler's). Logging is off (no ``configure_logging``), as in production
unless a log directory is set. Cases:

- sessions per second: ``--batch`` send+receive pairs (one 256-byte block each) are
  admitted, then each engine ticks until every handle is done and every session released.
  Baseline: the raw data path of the same sessions with no engine: ``cuda_ext.gather`` into
  a preallocated staging buffer, loopback ``post_recv`` + ``post_send`` (matched at post
  time), ``poll()`` on both ends and ``cuda_ext.scatter``. Reported twice: the sessions
  admitted with single ``send()`` / ``receive()`` calls, and with one ``send_many()`` and
  one ``receive_many()`` per round. Goal: engine >= 0.5 of raw.
- tick cost: one ``_tick()`` of the receiving engine that completes 10 ready receives while
  10 000 other receives stay pending (posted, never matched), against the same tick with 100
  pending. Goal: ratio <= 1.5.

Rounds of the sides alternate; sessions/s is the throughput over every round (the rounds
in which the cyclic collector makes a full pass included: a serving loop pays them too), the
tick cost a median. The process is pinned to one core when the OS allows it (the goal is per
core). The sessions/s rows come twice: with Python's default collector, and after
``gc.freeze()`` (what serving engines do once started: the collector's full passes then no
longer walk the long-lived objects of torch and the model).

``--against REV`` measures what a change cost: the sessions/s case of this tree and of git
revision ``REV`` (extracted with ``git archive`` into a temporary directory, its block copy
built in its own cache), each in a fresh process, alternating, ``--repeats`` times; the
table gives both medians and the ratio (e.g. the outcome handshake's DONE message:
``--against aeab1cd``, the commit before it).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch
from kvhandoff import cuda_ext
from kvhandoff.engine import BlockPool, EngineConfig, TransferEngine
from kvhandoff.engine._agreement import OK, QUIESCENT, Agreement, absorb_round

try:  # ``--against`` runs this script over older trees, from before the batched calls
    from kvhandoff.engine import TransferRequest
except ImportError:
    TransferRequest = None
from kvhandoff.engine.transports import loopback_group

# Generous bounds: no session of this benchmark may time out or lose its peer's lease.
CONFIG = EngineConfig(queue_timeout_s=3600.0, transfer_timeout_s=3600.0, lease_s=3600.0)
POOL = dict(num_layers=2, block_tokens=4, kv_heads=1, head_dim=8, dtype=torch.float16)
READY = 10


def make_pool(num_blocks: int) -> BlockPool:
    return BlockPool(num_blocks, **POOL)  # type: ignore[arg-type]


class Pair:
    """Two engines on one loopback group, blocks allocated once and reused every round."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        t0, t1 = loopback_group(2)
        self.pools = (make_pool(batch), make_pool(batch))
        self.src = self.pools[0].alloc(batch, owner="bench")
        self.dst = self.pools[1].alloc(batch, owner="bench")
        self.sender = TransferEngine(self.pools[0], t0, config=CONFIG)
        self.receiver = TransferEngine(self.pools[1], t1, config=CONFIG)
        self.serial = 0

    def round(self) -> None:
        """``batch`` sessions end to end with single calls; asserts every one completed and
        was released."""
        sender, receiver = self.sender, self.receiver
        handles = []
        base = self.serial
        self.serial += self.batch
        for i in range(self.batch):
            rid = f"r{base + i}"
            handles.append(sender.send(rid, (self.src[i],), 1))
            handles.append(receiver.receive(rid, (self.dst[i],), 0))
        self._finish(handles)

    def round_batched(self) -> None:
        """The same sessions admitted with one ``send_many`` and one ``receive_many``."""
        base = self.serial
        self.serial += self.batch
        rids = [f"r{base + i}" for i in range(self.batch)]
        handles = self.sender.send_many(
            [TransferRequest(rid, (self.src[i],), 1) for i, rid in enumerate(rids)])
        handles += self.receiver.receive_many(
            [TransferRequest(rid, (self.dst[i],), 0) for i, rid in enumerate(rids)])
        self._finish(handles)

    def _finish(self, handles: list[Any]) -> None:
        sender, receiver = self.sender, self.receiver
        for _ in range(100):
            sender._tick()
            receiver._tick()
            if not sender._transfers and not receiver._transfers:
                break
        assert all(h.done and h._error is None for h in handles), "a session did not complete"
        assert not sender._transfers and not receiver._transfers, "a session was not released"


class RawPair:
    """The data path of ``Pair.round`` without an engine."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.t0, self.t1 = loopback_group(2)
        self.pools = (make_pool(batch), make_pool(batch))
        nbytes = self.pools[0].block_nbytes
        self.staging = (torch.empty(nbytes * batch, dtype=torch.uint8),
                        torch.empty(nbytes * batch, dtype=torch.uint8))
        self.nbytes = nbytes

    def round(self) -> None:
        t0, t1 = self.t0, self.t1
        layers0, layers1 = self.pools[0].layers, self.pools[1].layers
        nbytes = self.nbytes
        recvs = []
        for i in range(self.batch):
            send_view = self.staging[0][i * nbytes:(i + 1) * nbytes]
            recv_view = self.staging[1][i * nbytes:(i + 1) * nbytes]
            recv = t1.post_recv(recv_view, 0, 1 + i)
            cuda_ext.gather(layers0, (i,), send_view)
            t0.post_send(send_view, 1, 1 + i)
            recvs.append((recv, recv_view, i))
        done = len(t0.poll())
        for _op in t1.poll():
            done += 1
        for recv, recv_view, i in recvs:
            assert recv.final and recv.error is None
            cuda_ext.scatter(recv_view, layers1, (i,))
        assert done == 2 * self.batch


def single_calls_per_second(batch: int, rounds: int) -> float:
    """Sessions per second over ``rounds`` rounds of single calls (``--against``: the one
    case every tree has, measured by this script whatever the tree)."""
    pair = Pair(batch)
    pair.round()
    return batch * rounds / sum(timed(pair.round) for _ in range(rounds))


def sessions_per_second(batch: int, rounds: int, *,
                        gc_freeze: bool = False) -> tuple[float, float, float]:
    """(engine with single calls, engine with batched calls, raw) sessions per second over
    all ``rounds``, rounds of the three alternating. ``gc_freeze``: ``gc.freeze()`` once
    everything is set up, as serving engines do after start-up (vLLM does), so the
    collector's full passes no longer walk the process's long-lived objects (torch's alone
    are ~170k); undone after."""
    ours, raw = Pair(batch), RawPair(batch)
    ours.round()  # warm-up: the compiled block copy loads, allocators settle
    ours.round_batched()
    raw.round()
    if gc_freeze:
        gc.collect()
        gc.freeze()
    single_times, batched_times, raw_times = [], [], []
    try:
        for _ in range(rounds):
            raw_times.append(timed(raw.round))
            single_times.append(timed(ours.round))
            batched_times.append(timed(ours.round_batched))
    finally:
        if gc_freeze:
            gc.unfreeze()
    # Throughput over every round (not the median round): the rounds in which the cyclic
    # collector makes a full pass are part of what a serving loop pays.
    done = batch * rounds
    return done / sum(single_times), done / sum(batched_times), done / sum(raw_times)


class TickCase:
    """A receiving engine with ``pending`` receives that never match, and a sender used only
    to complete ``READY`` more receives right before the timed tick."""

    def __init__(self, pending: int) -> None:
        t0, t1 = loopback_group(2)
        self.pools = (make_pool(READY), make_pool(pending + READY))
        self.src = self.pools[0].alloc(READY, owner="bench")
        self.stuck = self.pools[1].alloc(pending, owner="bench")
        self.dst = self.pools[1].alloc(READY, owner="bench")
        self.sender = TransferEngine(self.pools[0], t0, config=CONFIG)
        self.receiver = TransferEngine(self.pools[1], t1, config=CONFIG)
        for i, block in enumerate(self.stuck):
            self.receiver.receive(f"stuck{i}", (block,), 0)
        self.serial = 0
        # The pending receives' advertises reach the sender as early advertises (no send
        # there matches them); take them in now, outside any timed tick.
        self.sender._tick()
        self.receiver._tick()

    def timed_tick(self) -> float:
        sender, receiver = self.sender, self.receiver
        base = self.serial
        self.serial += READY
        handles = []
        for i in range(READY):
            rid = f"ready{base + i}"
            handles.append(receiver.receive(rid, (self.dst[i],), 0))
            sender.send(rid, (self.src[i],), 1)
        sender._tick()  # takes the advertises and posts the sends: the receives are final
        start = time.perf_counter()
        receiver._tick()  # completes, scatters and releases the READY sessions
        elapsed = time.perf_counter() - start
        assert all(h.done and h._error is None for h in handles), "a ready receive failed"
        assert len(receiver._transfers) == len(self.stuck), "a session was not released"
        return elapsed


def tick_cost(rounds: int) -> tuple[float, float]:
    many, few = TickCase(10_000), TickCase(100)
    for _ in range(5):  # warm-up
        many.timed_tick()
        few.timed_tick()
    many_times, few_times = [], []
    for _ in range(rounds):
        few_times.append(few.timed_tick())
        many_times.append(many.timed_tick())
    return statistics.median(many_times), statistics.median(few_times)


def agreement_cost(ranks: int = 4, sizes: tuple[int, int] = (16, 4096),
                   repeats: int = 51) -> list[tuple[int, float]]:
    """Seconds per report of one TP agreement round (``absorb_round`` of ``ranks`` ranks'
    reports, then ``verdict`` and ``settle`` of each request, as ``GroupSync`` does), for a
    round of each size in ``sizes``: the round costs O(reports) when the two agree."""
    out = []
    for size in sizes:
        times = []
        for _ in range(repeats):
            agreement = Agreement(ranks, 60.0)
            rids = [f"r{i}" for i in range(size // ranks)]
            round_ = [(False, [(rid, code, None, None) for rid in rids
                               for code in (OK, QUIESCENT)][:size // ranks])
                      for _ in range(ranks)]
            start = time.perf_counter()
            _, touched = absorb_round(agreement, round_, 0.0)
            for rid in dict.fromkeys(touched):
                if agreement.verdict(rid)[2]:
                    agreement.settle(rid)
            times.append(time.perf_counter() - start)
        out.append((size, statistics.median(times) / size))
    return out


def print_by_module(stats: pstats.Stats, pairs: int) -> None:
    """The profile's own time (``tottime``) per module of ours, in microseconds per
    send+receive pair (cProfile's overhead inflates every figure alike; the shares are what
    to read), then the rest (torch, builtins) together."""
    per_module: dict[str, float] = {}
    total = 0.0
    for (path, _, _), row in stats.stats.items():  # type: ignore[attr-defined]
        tottime = row[2]
        total += tottime
        parts = Path(path).parts
        key = "other (torch, builtins, attrs' generated code)"
        for package in ("sessions", "collectives", "cuda_ext", "engine"):
            if package in parts:
                key = "/".join(parts[parts.index(package):])
                break
        per_module[key] = per_module.get(key, 0.0) + tottime
    print(f"\nown time per module, us per send+receive pair ({pairs} pairs, under cProfile)")
    print("| module | us/pair | share |")
    print("| --- | ---: | ---: |")
    for key, seconds in sorted(per_module.items(), key=lambda kv: -kv[1]):
        if seconds / total >= 0.005:
            print(f"| {key} | {seconds / pairs * 1e6:.1f} | {seconds / total:.1%} |")


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


async def bench(args: Any) -> None:
    if args.profile:
        pair = Pair(args.batch)
        pair.round()
        pair.round_batched()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.rounds):
            pair.round_batched() if args.batched else pair.round()
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.sort_stats(args.sort).print_stats(40)
        print_by_module(stats, args.batch * args.rounds)
        return
    rows = [(frozen, *sessions_per_second(args.batch, args.rounds, gc_freeze=frozen))
            for frozen in (False, True)]
    many, few = tick_cost(max(args.rounds, 51))
    per_report = agreement_cost()
    print(f"TransferEngine on loopback, direct _tick() calls, one process, {args.rounds} "
          f"alternating rounds (cuda_ext backend: {cuda_ext.backend()})")
    print("| case | baseline | engine | ratio | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
    for frozen, ours, batched, raw in rows:
        gc_label = "after gc.freeze()" if frozen else "default gc"
        for label, value in (("single send()/receive() calls", ours),
                             ("one send_many() + one receive_many()", batched)):
            print(f"| sessions/s, {args.batch} send+receive pairs per round ({label}, "
                  f"{gc_label}) vs raw gather+post+scatter | {raw:,.0f}/s | {value:,.0f}/s | "
                  f"{value / raw:.3f} | >= 0.5 of raw: "
                  f"{'met' if value >= 0.5 * raw else 'missed'} |")
    print(f"| one _tick() completing {READY} ready receives: 10,000 pending vs 100 pending | "
          f"{few * 1e6:.0f} us | {many * 1e6:.0f} us | {many / few:.2f}x | <= 1.5x: "
          f"{'met' if many / few <= 1.5 else 'missed'} |")
    (small_n, small), (large_n, large) = per_report
    print(f"| TP agreement round: absorbing a round of 4 ranks' reports, per report: "
          f"{small_n:,} vs {large_n:,} reports | {small * 1e9:,.0f} ns | {large * 1e9:,.0f} ns | "
          f"{large / small:.2f}x | O(reports): per-report cost flat |")


_ONE_RUN = """
import os, sys, torch
if hasattr(os, "sched_setaffinity"):
    try:
        os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
    except OSError:
        pass
torch.set_num_threads(1)
sys.path.insert(0, {bench_dir!r})
import bench_engine
print(bench_engine.single_calls_per_second({batch}, {rounds}))
"""


def against(args: Any) -> None:
    """This tree's sessions/s against revision ``args.against``'s, alternating processes."""
    here = Path(__file__).resolve().parent
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, check=True,
                               capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="kvh-against-") as tmp:
        old = Path(tmp) / "kvhandoff"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.against], cwd=root, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        # This script measures both trees (the same metric), each tree's package imported.
        trees = {
            "after": (here, dict(os.environ)),
            "before": (here, {**os.environ, "PYTHONPATH": tmp,
                              "KVHANDOFF_CACHE_DIR": str(Path(tmp) / "cache")}),
        }
        runs: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            for label in ("before", "after"):
                bench_dir, env = trees[label]
                code = _ONE_RUN.format(bench_dir=str(bench_dir), batch=args.batch,
                                       rounds=args.rounds)
                out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                     capture_output=True, text=True, cwd=tmp).stdout
                runs[label].append(float(out.split()[-1]))
    ratios = [a / b for a, b in zip(runs["after"], runs["before"], strict=True)]
    before, after = statistics.median(runs["before"]), statistics.median(runs["after"])
    print(f"sessions/s, {args.batch} send+receive pairs per round, {args.rounds} rounds per "
          f"process, {args.repeats} alternating processes per side, medians")
    print(f"| case | before ({args.against}) | after (this tree) | ratio | ratios per repeat |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| sessions/s | {before:,.0f}/s | {after:,.0f}/s | {after / before:.3f} | "
          f"{min(ratios):.3f} .. {max(ratios):.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the engine rounds instead of benchmarking")
    parser.add_argument("--sort", default="tottime", help="pstats sort key for --profile")
    parser.add_argument("--batched", action="store_true",
                        help="--profile the rounds of send_many/receive_many instead")
    parser.add_argument("--against", metavar="REV",
                        help="compare sessions/s with git revision REV instead")
    parser.add_argument("--repeats", type=int, default=7, help="processes per side (--against)")
    args = parser.parse_args()
    if args.against:
        against(args)
        return 0
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        except OSError:
            pass  # not allowed here: run on whatever cores the OS gives
    torch.set_num_threads(1)
    anyio.run(bench, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
