"""The collectives seed scenarios over torch.distributed (gloo, CPU).

``python coll_torch_scenarios.py NPROCS PORT [LOG_DIR]`` forks NPROCS ranks that join a gloo
group on 127.0.0.1:PORT and run the same scenarios as the MPI script; exits non-zero if any
rank fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mpi_scripts"))

from coll_scenarios import run_scenarios
from kvhandoff.collectives import CheckedComm, configure_logging


def rank_main(rank: int, size: int, port: str, log_dir: str | None) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    dist.init_process_group("gloo", rank=rank, world_size=size)
    if log_dir is not None:
        configure_logging(log_dir)

    def make(name: str, timeout: float) -> CheckedComm:
        return CheckedComm.from_torch(name=name, timeout=timeout)

    run_scenarios(make, rank, size)
    # Rank 0 hosts the store: nobody leaves before everyone is done with it. The checked
    # comms ran on private groups, so the default group is still in step.
    dist.barrier()
    sys.stdout.flush()
    # The timed-out scenario leaves an all_gather pending for good: skip the group teardown.
    os._exit(0)


if __name__ == "__main__":
    nprocs, port = int(sys.argv[1]), sys.argv[2]
    log_dir = sys.argv[3] if len(sys.argv) > 3 else None
    mp.start_processes(rank_main, args=(nprocs, port, log_dir), nprocs=nprocs,
                       start_method="fork")
