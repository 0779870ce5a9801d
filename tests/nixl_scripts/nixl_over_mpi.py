"""NixlTransport bootstrapped over MPI (``NixlTransport.over_mpi``), under ``mpiexec -n N``:
every rank writes pool blocks to the next rank and receives from the previous one at the
same time, bytes checked; a control message goes round the ring. MPI carries only the
agents' metadata; the data and the control messages travel over NIXL. A failed check aborts
every rank (tests/mpi_scripts/_harness.py)."""

from __future__ import annotations

import time

import torch
from _harness import mpi_main
from kvhandoff.engine.transports import HandleState, NixlTransport, block_regions

LIMIT_S = 30.0


def pattern(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(-1000, 1000, (32, 4, 64), generator=generator, dtype=torch.int16)
            for _ in range(4)]


def main(comm: object) -> None:
    transport = NixlTransport.over_mpi(comm)
    rank, world = transport.rank, transport.world_size
    after, before = (rank + 1) % world, (rank - 1) % world
    mine = pattern(rank)
    inbox = [torch.zeros(48, 4, 64, dtype=torch.int16) for _ in range(4)]
    recv = transport.post_recv_regions(block_regions(inbox, [40, 41, 2, 3]), before, 5)
    send = transport.post_send_regions(block_regions(mine, [7, 8, 9, 30]), after, 5)
    transport.send_control(after, f"hello from {rank}".encode())
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + LIMIT_S
    while not (recv.final and send.final and got):
        assert time.monotonic() < deadline, (recv, send, got)
        transport.poll()
        got += transport.recv_control()
    assert (recv.state, send.state) == (HandleState.DONE, HandleState.DONE), (recv, send)
    assert got == [(before, f"hello from {before}".encode())], got
    for have, want in zip(inbox, pattern(before), strict=True):
        assert torch.equal(have[[40, 41, 2, 3]], want[[7, 8, 9, 30]])
    comm.Barrier()  # type: ignore[attr-defined]
    transport.close()
    assert transport.release_memory()
    print(f"rank {rank}/{world} nixl over mpi OK", flush=True)


if __name__ == "__main__":
    mpi_main(main)
