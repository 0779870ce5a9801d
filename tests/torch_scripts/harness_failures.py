"""The harness's failure paths: ``python harness_failures.py raise|hang`` starts two ranks.

``raise``: rank 1 raises while rank 0 waits for it in a barrier. ``hang``: rank 1 never
returns (a 3 s deadline). Either way the job must end with exit status 1 and one report
(rank 1's traceback, or the launcher's list of running ranks), and rank 0 never gets past
the barrier: it is terminated, not left hanging."""

from __future__ import annotations

import sys
import time

import torch.distributed as dist
from _harness import torch_main

HANG_DEADLINE_S = 3.0


def rank_main(rank: int, world: int, mode: str) -> None:
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("rank 1 fails on purpose")
        time.sleep(3600)
    dist.barrier()  # never completes: rank 1 is gone or stuck
    print(f"rank {rank} passed the barrier", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    torch_main(rank_main, 2, mode, deadline_s=HANG_DEADLINE_S if mode == "hang" else 60.0)
