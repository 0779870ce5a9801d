"""Checked vs raw collectives, measured side by side in one run.

``python benchmarks/bench_collectives.py`` launches itself under ``mpiexec -n 2`` and prints,
per case, the median and the minimum time per call of the raw mpi4py call and of the
CheckedComm call, and their ratios (goal for the small-object allgather: checked <= 1.05x
raw). Both sides move the same object in the same pattern; rounds of the two alternate, and
which side goes first alternates too, so that machine noise and barrier skew hit both. The
raw buffer call reuses a preallocated receive buffer; the checked one returns a new array
(its API). Also: the in-process backend's non-blocking allgather as the engine uses it once
per tick (no raw baseline: per-call cost only).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CALLS = 200
ROUNDS = 41
SMALL = {"request_id": "req-17", "state": 3, "ok": True}


def timed(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def side_by_side(world: Any, raw: Callable[[], Any],
                 checked: Callable[[], Any]) -> tuple[float, float, float, float]:
    """Many short alternating rounds (a noisy shared machine drifts); returns the median and
    the minimum per-call time of each side. Rank 0's clock is reported."""
    raw_times: list[float] = []
    checked_times: list[float] = []
    for round_ in range(ROUNDS):
        sides = [(raw, raw_times), (checked, checked_times)]
        for fn, times in sides if round_ % 2 == 0 else sides[::-1]:
            world.Barrier()
            times.append(timed(fn, CALLS))
    return (statistics.median(raw_times), statistics.median(checked_times),
            min(raw_times), min(checked_times))


def worker() -> None:
    import numpy as np
    from kvhandoff.collectives import CheckedComm
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    raw_comm = world.Dup()
    checked = CheckedComm.from_mpi(world, name="bench", timeout=60)
    checked_off = CheckedComm.from_mpi(world, name="bench-off", timeout=60, buffer_check="off")
    for _ in range(200):  # warm up both paths
        raw_comm.allgather(SMALL)
        checked.allgather(SMALL)

    send = np.arange(16, dtype=np.int64)
    recv = np.empty((world.Get_size(), 16), dtype=np.int64)
    rows = [
        ("allgather small object (piggyback)",
         side_by_side(world, lambda: raw_comm.allgather(SMALL), lambda: checked.allgather(SMALL))),
        ("allgather 16 x int64 buffer, preflight",
         side_by_side(world, lambda: raw_comm.Allgather(send, recv),
                      lambda: checked.allgather_buffer(send))),
        ("allgather 16 x int64 buffer, check off",
         side_by_side(world, lambda: raw_comm.Allgather(send, recv),
                      lambda: checked_off.allgather_buffer(send))),
    ]
    if world.Get_rank() == 0:
        print(f"mpi4py {__import__('mpi4py').__version__}, {world.Get_size()} ranks, "
              f"{ROUNDS} alternating rounds of {CALLS} calls; per call, rank 0")
        print(f"{'case':40} {'raw med':>8} {'chk med':>8} {'ratio':>6} "
              f"{'raw min':>8} {'chk min':>8} {'ratio':>6}")
        for name, (raw_med, chk_med, raw_min, chk_min) in rows:
            print(f"{name:40} {raw_med * 1e6:7.1f}u {chk_med * 1e6:7.1f}u "
                  f"{chk_med / raw_med:5.2f}x {raw_min * 1e6:7.1f}u {chk_min * 1e6:7.1f}u "
                  f"{chk_min / raw_min:5.2f}x")
        sys.stdout.flush()
    checked.close()
    checked_off.close()


def local_tick_cost() -> None:
    """Per-call cost of the in-process iallgather + test() round the engine runs per tick."""
    from kvhandoff.collectives import local_group

    comms = local_group(4, "tp", timeout=60)

    def tick() -> None:
        handles = [c.iallgather(SMALL, tag="agree") for c in comms]
        for h in handles:
            h.test()
            h.result()

    tick()
    rounds = [timed(tick, 500) for _ in range(ROUNDS)]
    print(f"in-process: iallgather+test on 4 ranks from one thread, per rank per tick: "
          f"median {statistics.median(rounds) * 1e6 / 4:.2f} us, "
          f"min {min(rounds) * 1e6 / 4:.2f} us")


def main() -> None:
    if "--worker" in sys.argv:
        worker()
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", "2", sys.executable,
           __file__, "--worker"]
    result = subprocess.run(cmd, timeout=600, env=dict(os.environ))
    if result.returncode != 0:
        sys.exit(result.returncode)
    local_tick_cost()


if __name__ == "__main__":
    main()
