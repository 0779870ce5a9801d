"""The collectives seed scenarios over torch.distributed (gloo, CPU).

``python coll_torch_scenarios.py NPROCS [LOG_DIR]`` forks NPROCS ranks (see _harness.py) that
run the same scenarios as the MPI script; exits non-zero if any rank fails."""

from __future__ import annotations

import sys
from pathlib import Path

# Appended, not prepended: mpi_scripts has a _harness.py of its own, and this folder's
# (sys.path[0]) is the one to import.
sys.path.append(str(Path(__file__).resolve().parent.parent / "mpi_scripts"))

from _harness import torch_main
from coll_scenarios import run_scenarios
from kvhandoff.collectives import CheckedComm, configure_logging


def rank_main(rank: int, size: int, log_dir: str | None) -> None:
    if log_dir is not None:
        configure_logging(log_dir)

    def make(name: str, timeout: float) -> CheckedComm:
        return CheckedComm.from_torch(name=name, timeout=timeout)

    # The checked comms run on private groups, so the default group the harness ends with
    # a barrier on is still in step.
    run_scenarios(make, rank, size)


if __name__ == "__main__":
    nprocs = int(sys.argv[1])
    log_dir = sys.argv[2] if len(sys.argv) > 2 else None
    # The timed-out scenario leaves an all_gather pending for good: no group teardown.
    torch_main(rank_main, nprocs, log_dir, start_method="fork", teardown=False)
