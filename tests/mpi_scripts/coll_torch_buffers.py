"""Torch tensors through the MPI backend's buffer collectives (moved as numpy, returned as
tensors), under ``mpiexec -n 2``."""

from __future__ import annotations

from typing import Any

import torch
from kvhandoff.collectives import CheckedComm


def main(world: Any) -> None:
    comm = CheckedComm.from_mpi(world, name="torch-buffers", timeout=30)
    size = comm.size
    stacked = comm.allgather_buffer(torch.arange(3) + comm.rank)
    assert isinstance(stacked, torch.Tensor)
    assert stacked.tolist() == [[r, r + 1, r + 2] for r in range(size)], stacked
    summed = comm.allreduce_buffer(torch.ones(2) * comm.rank, "sum")
    assert isinstance(summed, torch.Tensor) and summed.tolist() == [sum(range(size))] * 2
    print(f"torch buffers rank {comm.rank} ok", flush=True)


if __name__ == "__main__":
    from _harness import mpi_main

    mpi_main(main)
