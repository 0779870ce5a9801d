"""One rank fails while its peer sits in a poll loop waiting for data that never comes:
``mpi_main`` must abort the whole job (non-zero exit) instead of leaving the peer hung."""

from __future__ import annotations

import time

import torch
from _harness import mpi_main
from kvhandoff.engine.transports import HandleState, MPITransport


def main(comm) -> None:
    t = MPITransport(comm)
    if t.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    handle = t.post_recv(torch.zeros(16, dtype=torch.uint8), 1, 1)
    while handle.test() is HandleState.PENDING:  # only the abort ends this
        time.sleep(0.001)


if __name__ == "__main__":
    mpi_main(main)
